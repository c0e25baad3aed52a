"""TF_CONFIG validation: every mistake is named before any TensorFlow server starts."""

from __future__ import annotations

import json

import pytest

from launcher.cluster import read_tf_config
from resnet18.runtime.errors import SetupError

WORKERS = {"worker": ["127.0.0.1:20001", "127.0.0.1:20002"]}


def tf_config(cluster=None, task=None) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster or WORKERS, "task": task or {"type": "worker", "index": 0}})}


def test_unset_or_empty_means_single_machine():
    assert read_tf_config({}) is None
    assert read_tf_config({"TF_CONFIG": "  "}) is None


def test_workers_only_worker_zero_is_chief():
    spec = read_tf_config(tf_config())
    assert spec.num_tasks == 2 and spec.is_chief and spec.rank == 0
    other = read_tf_config(tf_config(task={"type": "worker", "index": 1}))
    assert not other.is_chief and other.rank == 1
    assert other.chief_address == "127.0.0.1:20001"


def test_explicit_chief_plus_workers():
    cluster = {"chief": ["10.0.0.1:2222"], "worker": ["10.0.0.2:2222", "10.0.0.3:2222"]}
    chief = read_tf_config(tf_config(cluster, {"type": "chief", "index": 0}))
    worker0 = read_tf_config(tf_config(cluster, {"type": "worker", "index": 0}))
    assert chief.is_chief and not worker0.is_chief
    assert chief.num_tasks == 3 and worker0.rank == 1


@pytest.mark.parametrize("raw, words", [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["must be a JSON object"]),
    (json.dumps({"task": {"type": "worker", "index": 0}}), ['TF_CONFIG["cluster"]']),
    (json.dumps({"cluster": WORKERS}), ['TF_CONFIG["task"]']),
    (json.dumps({"cluster": WORKERS, "task": {"type": "chief", "index": 0}}), ['["task"]["type"]', "'chief'"]),
    (json.dumps({"cluster": WORKERS, "task": {"type": "worker", "index": 2}}), ["index", "out of range", "0..1"]),
    (json.dumps({"cluster": WORKERS, "task": {"type": "worker", "index": "0"}}), ["must be an integer"]),
    (json.dumps({"cluster": {"chief": ["a:1", "b:2"], "worker": ["c:3"]}, "task": {"type": "worker", "index": 0}}),
     ["at most one chief"]),
    (json.dumps({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}),
     ["address 'a:1' is also used by"]),
    (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}),
     ['["ps"]', "ParameterServerStrategy"]),
    (json.dumps({"cluster": {"worker": ["a:1"], "evaluator": ["b:2", "c:3"]}, "task": {"type": "worker", "index": 0}}),
     ['["evaluator"] lists 2 tasks', "at most one evaluator"]),
    (json.dumps({"cluster": {"evaluator": ["b:2"]}, "task": {"type": "evaluator", "index": 0}}),
     ["no \"chief\" or \"worker\" task"]),
    (json.dumps({"cluster": {"worker": ["a:1"], "trainer": ["b:2"]}, "task": {"type": "worker", "index": 0}}),
     ["unknown role"]),
    (json.dumps({"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}), ['"host:port"']),
    (json.dumps({"cluster": {"worker": ["a:99999"]}, "task": {"type": "worker", "index": 0}}), ["1..65535"]),
    (json.dumps({"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}), ["non-empty list"]),
])
def test_bad_tf_config_names_the_field(raw, words):
    with pytest.raises(SetupError) as error:
        read_tf_config({"TF_CONFIG": raw})
    for word in words:
        assert word in str(error.value)


def test_an_evaluator_task_is_accepted_listed_in_the_cluster_or_not():
    kubeflow = read_tf_config(tf_config(cluster={"worker": ["a:1", "b:1"], "evaluator": ["c:1"]},
                                        task={"type": "evaluator", "index": 0}))
    vertex = read_tf_config(tf_config(cluster={"chief": ["a:1"], "worker": ["b:1"]},
                                      task={"type": "evaluator", "index": 0}))
    for spec in (kubeflow, vertex):
        assert spec.is_evaluator and not spec.is_chief and spec.num_tasks == 2
    assert kubeflow.address == "c:1" and vertex.address is None
    worker = read_tf_config(tf_config(cluster={"worker": ["a:1", "b:1"], "evaluator": ["c:1"]}))
    assert worker.num_tasks == 2 and worker.is_chief  # the evaluator trains nothing
