"""The cluster job files against their systems' real schemas, vendored in tests/schemas/ (SOURCES.md):
Kubeflow Trainer v2's TrainJob and TrainingRuntime CRDs and the JobSet CRD they build on, the legacy
TFJob CRD (Training Operator v1.9.4), and Vertex AI's CustomJobSpec (from its protos).

Each test also runs a mutated copy the real system would refuse, so a check that passes everything
fails here. What the schemas cannot say (documented values the CRDs type as free strings, the rules
of Vertex AI's docs, what Trainer's controllers build from a TrainJob) is checked by hand, naming
where the rule comes from.
"""

from __future__ import annotations

import copy
import json
import os

import kubernetes_validate
import pytest
import yaml

from launcher.cluster import parse_tf_config
from resnet18.runtime.errors import SetupError
from tests.conftest import REPO
from tests.schemas.crd import load_schema, schema_errors

JOBS = os.path.join(REPO, "jobs")
KUBERNETES_VERSION = "1.30.0"  # as tests/test_job_files.py
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def documents(name: str) -> dict[str, dict]:
    with open(os.path.join(JOBS, name), encoding="utf-8") as stream:
        return {document["kind"]: document for document in yaml.safe_load_all(stream) if document}


def kubernetes_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{obj['kind']}: {str(error).splitlines()[0]}"]
    return []


# --- The legacy TFJob ---------------------------------------------------------------------------

def tfjob_errors(tfjob: dict) -> tuple[list[str], set[str]]:
    errors, unchecked = schema_errors(load_schema("tfjob.kubeflow.org_v1.json"), tfjob, kubernetes=True)
    # The CRD types these as free strings; the operator's documented values (kubeflow/trainer v1.9.4).
    for role, replica in tfjob["spec"]["tfReplicaSpecs"].items():
        if role not in ("PS", "Worker", "Chief", "Master", "Evaluator"):
            errors.append(f"tfReplicaSpecs.{role}: not PS, Worker, Chief, Master or Evaluator")
        if replica.get("restartPolicy") not in ("Always", "OnFailure", "Never", "ExitCode"):
            errors.append(f"tfReplicaSpecs.{role}.restartPolicy {replica.get('restartPolicy')!r}")
    if tfjob["spec"].get("runPolicy", {}).get("cleanPodPolicy", "None") not in ("All", "Running", "None"):
        errors.append("runPolicy.cleanPodPolicy")
    return errors, unchecked


def test_the_legacy_tfjob_fits_the_tfjob_crd():
    assert tfjob_errors(documents("tfjob_multiworker_gpu.yaml")["TFJob"]) == ([], set())


def test_the_tfjob_leaves_its_evaluator_running_once_the_chief_succeeds():
    # With a Chief, the v1 operator marks the TFJob Succeeded as soon as the chief is (UpdateJobStatus), and then
    # deletes the pods cleanPodPolicy names: Running (or All) would end the evaluator before the last epoch's
    # evaluation, which only starts once the chief has written that epoch's checkpoint.
    spec = documents("tfjob_multiworker_gpu.yaml")["TFJob"]["spec"]
    assert "Evaluator" in spec["tfReplicaSpecs"] and "Chief" in spec["tfReplicaSpecs"]
    assert spec["runPolicy"].get("cleanPodPolicy", "None") == "None"


# --- Vertex AI ----------------------------------------------------------------------------------

def vertex_errors(spec: dict) -> list[str]:
    errors, _ = schema_errors(load_schema("vertex_ai_customjobspec_v1.json"), spec, kubernetes=False)
    # Vertex AI's distributed-training docs: pool 0 is the primary, exactly one replica.
    pools = spec.get("workerPoolSpecs", [])
    if not pools or not pools[0] or int(pools[0].get("replicaCount", 1)) != 1:
        errors.append("workerPoolSpecs[0]: the primary pool must exist and have exactly 1 replica")
    for index, pool in enumerate(pools):
        if pool and not ({"containerSpec", "pythonPackageSpec"} & set(pool) and "machineSpec" in pool):
            errors.append(f"workerPoolSpecs[{index}]: a non-empty pool needs a task and a machineSpec")
    return errors


def test_the_vertex_ai_job_fits_the_customjobspec():
    with open(os.path.join(JOBS, "vertex_ai_multiworker.yaml"), encoding="utf-8") as stream:
        assert vertex_errors(yaml.safe_load(stream)) == []


# --- Kubeflow Trainer v2 ------------------------------------------------------------------------

def trainjob_errors(objects: dict[str, dict]) -> tuple[list[str], set[str]]:
    """The TrainJob, its runtime and the runtime's JobSet against their CRDs, then the trainer pod as
    Trainer's controllers build it (pkg/runtime/framework/plugins/jobset/builder.go: trainer.* onto the
    container named `node`) against Kubernetes' Pod schema, and the TF_CONFIG each pod gets against the
    launcher's validation."""
    trainjob, runtime = objects["TrainJob"], objects["TrainingRuntime"]
    errors, unchecked = [], set()
    jobset = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": trainjob["metadata"],
              "spec": runtime["spec"]["template"]["spec"]}
    for schema, obj in (("trainjob.trainer.kubeflow.org_v1alpha1.json", trainjob),
                        ("trainingruntime.trainer.kubeflow.org_v1alpha1.json", runtime),
                        ("jobset.x-k8s.io_v1alpha2.json", jobset)):
        found, not_checked = schema_errors(load_schema(schema), obj, kubernetes=True)
        errors += [f"{obj['kind']}{error}" for error in found]
        unchecked |= not_checked
    if trainjob["spec"]["runtimeRef"]["name"] != runtime["metadata"]["name"]:
        errors.append("runtimeRef does not name the TrainingRuntime of this file")
    (job,) = [job for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]
              if job["template"]["metadata"]["labels"].get("trainer.kubeflow.org/trainjob-ancestor-step") == "trainer"]
    if job.get("replicas", 1) != 1:  # pkg/webhooks/trainingruntime_webhook.go
        errors.append("the trainer replicatedJob's replicas must be 1")
    pod = copy.deepcopy(job["template"]["spec"]["template"])
    if pod["spec"].get("restartPolicy") != "Never":  # Kubernetes: podFailurePolicy needs Never
        errors.append("a podFailurePolicy needs restartPolicy Never (JobSet's default is OnFailure)")
    (container,) = [container for container in pod["spec"]["containers"] if container["name"] == "node"]
    trainer = trainjob["spec"]["trainer"]
    container.update({field: trainer[field] for field in ("image", "command", "args") if field in trainer})
    container.setdefault("env", []).extend(trainer.get("env", []))
    container["resources"] = trainer.get("resourcesPerNode", {})
    errors += kubernetes_errors({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node"}, "spec": pod["spec"]})
    errors += kubernetes_errors(objects["PersistentVolumeClaim"]) + kubernetes_errors(objects["NetworkPolicy"])
    errors += tf_config_errors(trainjob, job, container)
    return errors, unchecked


def tf_config_errors(trainjob: dict, job: dict, container: dict) -> list[str]:
    """Every pod's TF_CONFIG (Kubernetes expands $(TF_TASK_INDEX), its completion index, into it)
    names the pods' own host names, <trainjob>-<job>-0-<index>.<trainjob> (JobSet's headless
    Service), and passes the launcher's validation with worker 0 as the chief."""
    env = [variable["name"] for variable in container["env"]]
    values = {variable["name"]: variable for variable in container["env"]}
    if values.get("TF_TASK_INDEX", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != COMPLETION_INDEX:
        return ["TF_TASK_INDEX must come from the pod's job-completion-index annotation"]
    if env.index("TF_TASK_INDEX") > env.index("TF_CONFIG"):
        return ["TF_TASK_INDEX must come before TF_CONFIG for $(TF_TASK_INDEX) to expand"]
    name, nodes = trainjob["metadata"]["name"], trainjob["spec"]["trainer"]["numNodes"]
    expected = [f"{name}-{job['name']}-0-{index}.{name}" for index in range(nodes)]
    errors, chiefs = [], []
    for index in range(nodes):
        tf_config = json.loads(values["TF_CONFIG"]["value"].replace("$(TF_TASK_INDEX)", str(index)))
        hosts = [address.rpartition(":")[0] for address in tf_config["cluster"]["worker"]]
        if hosts != expected:
            errors.append(f"TF_CONFIG workers {hosts} are not the pods' host names {expected}")
        try:
            chiefs += [index] if parse_tf_config(tf_config).is_chief else []
        except SetupError as error:
            errors.append(f"pod {index}: {error}")
    return errors + ([] if chiefs == [0] else [f"chiefs {chiefs}, not worker 0"])


def test_the_trainjob_fits_trainer_v2_and_jobset_and_its_pods_get_a_valid_tf_config():
    assert trainjob_errors(documents("trainjob_multiworker_gpu.yaml")) == ([], set())


# --- What the real systems would refuse ---------------------------------------------------------

def broken(name: str, kind: str, change) -> dict[str, dict]:
    objects = copy.deepcopy(documents(name))
    change(objects[kind])
    return objects


@pytest.mark.parametrize("name, kind, change, words", [
    ("trainjob_multiworker_gpu.yaml", "TrainJob", lambda o: o["spec"]["trainer"].update(numNode=2),
     "Additional properties are not allowed ('numNode'"),
    ("trainjob_multiworker_gpu.yaml", "TrainJob", lambda o: o["metadata"].update(name="ResNet18"),
     "CEL rule"),
    ("trainjob_multiworker_gpu.yaml", "TrainingRuntime", lambda o: o["spec"]["mlPolicy"].update(torch={}, mpi={}),
     "CEL rule"),
    ("trainjob_multiworker_gpu.yaml", "TrainingRuntime",
     lambda o: o["spec"]["template"]["spec"]["failurePolicy"].update(restartStrategy="Sometimes"), "Sometimes"),
    ("trainjob_multiworker_gpu.yaml", "TrainJob", lambda o: o["spec"]["trainer"].update(numNodes=3),
     "are not the pods' host names"),
    ("trainjob_multiworker_gpu.yaml", "TrainingRuntime",
     lambda o: o["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"].update(
         restartPolicy="OnFailure"), "restartPolicy Never"),
])
def test_the_trainjob_checks_refuse_what_kubernetes_would(name, kind, change, words):
    errors, _ = trainjob_errors(broken(name, kind, change))
    assert any(words in error for error in errors), errors


@pytest.mark.parametrize("change, words", [
    (lambda o: o["spec"]["tfReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes"), "restartPolicy 'Sometimes'"),
    (lambda o: o["spec"]["tfReplicaSpecs"]["Worker"].update(replica=2), "Additional properties"),
])
def test_the_tfjob_checks_refuse_what_the_operator_would(change, words):
    errors, _ = tfjob_errors(broken("tfjob_multiworker_gpu.yaml", "TFJob", change)["TFJob"])
    assert any(words in error for error in errors), errors


@pytest.mark.parametrize("change, words", [
    (lambda spec: spec["workerPoolSpecs"][0].update(replicaCount=2), "exactly 1 replica"),
    (lambda spec: spec["workerPoolSpecs"][1]["machineSpec"].update(acceleratorType="NVIDIA_TESLA_Z9"),
     "'NVIDIA_TESLA_Z9' is not one of"),
    (lambda spec: spec["workerPoolSpecs"][1].update(worker_count=2), "Additional properties"),
])
def test_the_vertex_checks_refuse_what_vertex_ai_would(change, words):
    with open(os.path.join(JOBS, "vertex_ai_multiworker.yaml"), encoding="utf-8") as stream:
        spec = yaml.safe_load(stream)
    change(spec)
    assert any(words in error for error in vertex_errors(spec)), vertex_errors(spec)
