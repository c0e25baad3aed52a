"""Multi-worker training with real processes talking over 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from launcher.cluster import parse_tf_config, environment_without_cluster
from launcher.processes import free_ports
from launcher.slurm import tf_config_from_slurm
from tests.conftest import REPO, TINY_JOB, run_launcher
from resnet18.runtime.errors import SetupError

FINGERPRINT = re.compile(r"^\[worker (\d)\] Final weights sha256 ([0-9a-f]{64})$", re.M)


def summary(workdir) -> dict:
    return json.loads((workdir / "summary.json").read_text())


@pytest.fixture(scope="module")
def two_worker_run(tiny_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_workers")
    result = run_launcher("--workers", "2", "--job", TINY_JOB, "--set", f"data.data_dir={tiny_data_dir}",
                          "train.deterministic=true", "--workdir", str(workdir))
    return result, workdir


@pytest.mark.slow
def test_two_local_workers_train_to_identical_weights(two_worker_run):
    result, workdir = two_worker_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = summary(workdir)
    assert run["num_replicas"] == 2 and run["strategy"] == "MultiWorkerMirroredStrategy"
    fingerprints = dict(FINGERPRINT.findall(result.stdout))
    assert set(fingerprints) == {"0", "1"}
    assert fingerprints["0"] == fingerprints["1"] == run["weights_sha256"]
    assert "All 2 worker(s) finished" in result.stdout
    assert not list(workdir.glob("launch_*.yaml"))  # the shared config file is cleaned up
    assert list((workdir / "checkpoints").glob("ckpt-*.index"))  # only the chief's directory


def assert_two_workers_match_two_replicas(workers: dict, replicas: dict) -> None:
    """Bitwise, in every precision: the same examples and augmentation reach replica r in both layouts
    (the order does not depend on the number of processes), each replica's batch has a static size in
    both (pipeline.static_batch), a sum of two values is one addition whatever the order, and with
    train.deterministic grappler regroups no additions (MirroredStrategy's cross-replica sums sit in the
    step's graph, MultiWorkerMirrored's are collectives). Before both fixes float32 diverged from the first
    epoch (every variable different) and the reported losses were one float32 ulp apart."""
    assert workers["global_batch_size"] == replicas["global_batch_size"] and workers["steps"] == replicas["steps"]
    assert workers["weights_sha256"] == replicas["weights_sha256"]
    assert len(workers["history"]) == len(replicas["history"])
    for first, second in zip(workers["history"], replicas["history"]):
        for key in ("test_loss", "test_accuracy", "train_loss", "train_accuracy", "learning_rate"):
            assert first[key] == second[key], key


@pytest.mark.slow
def test_two_workers_match_one_process_with_two_cpu_replicas(two_worker_run, tiny_data_dir, tmp_path):
    """Auto precision: bfloat16 where the CPU has it natively, float32 elsewhere."""
    result, workdir = two_worker_run
    assert result.returncode == 0
    single = run_launcher("--cpu_replicas", "2", "--job", TINY_JOB, "--set", f"data.data_dir={tiny_data_dir}",
                          "train.deterministic=true", "--workdir", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    assert_two_workers_match_two_replicas(summary(workdir), summary(tmp_path / "single"))


@pytest.mark.slow
def test_two_workers_match_two_cpu_replicas_in_float32(tiny_data_dir, tmp_path):
    """float32 on every CPU (auto picks bfloat16 where the CPU has it natively), where the layouts diverged."""
    runs = {}
    for name, layout in (("workers", "--workers"), ("replicas", "--cpu_replicas")):
        result = run_launcher(layout, "2", "--job", TINY_JOB, "--set", f"data.data_dir={tiny_data_dir}",
                              "train.deterministic=true", "train.precision=float32",
                              "--workdir", str(tmp_path / name))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[name] = summary(tmp_path / name)
    assert_two_workers_match_two_replicas(runs["workers"], runs["replicas"])


def start(args, env_extra):
    env = environment_without_cluster()
    env.update(TF_CPP_MIN_LOG_LEVEL="3", **env_extra)
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_explicit_chief_and_worker_started_by_hand(tiny_data_dir, tmp_path):
    chief_port, worker_port = free_ports(2)
    cluster = {"chief": [f"127.0.0.1:{chief_port}"], "worker": [f"127.0.0.1:{worker_port}"]}
    args = ["--job", TINY_JOB, "--set", f"data.data_dir={tiny_data_dir}", "--workdir", str(tmp_path)]
    processes = [start(args, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": role, "index": 0}})})
                 for role in ("chief", "worker")]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert summary(tmp_path)["num_replicas"] == 2
    assert "Done: test_accuracy" in outputs[0] and "Done:" not in outputs[1]  # only the chief reports
    fingerprints = [re.findall(r"Final weights sha256 (\w+)", output) for output in outputs]
    assert fingerprints[0] == fingerprints[1] and len(fingerprints[0]) == 1  # same final weights


@pytest.mark.slow
def test_slurm_variables_make_a_two_task_job(tiny_data_dir, tmp_path):
    """Two tasks with the variables `srun -n 2` sets on one node."""
    port_base = free_ports(1)[0]
    args = ["--job", TINY_JOB, "--set", f"data.data_dir={tiny_data_dir}", "train.epochs=1", "--workdir", str(tmp_path)]
    slurm = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2",
             "SLURMD_NODENAME": "localhost", "LAUNCHER_SLURM_PORT_BASE": str(port_base)}
    processes = [start(args, {**slurm, "SLURM_PROCID": str(rank)}) for rank in (0, 1)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "TF_CONFIG from Slurm" in outputs[1]
    assert summary(tmp_path)["num_replicas"] == 2


@pytest.mark.slow
def test_kill_9_of_one_worker_ends_the_group_within_30_seconds(tiny_data_dir, tmp_path):
    launcher = start(["--workers", "2", "--job", TINY_JOB, "--set", f"data.data_dir={tiny_data_dir}",
                      "train.epochs=200", "--workdir", str(tmp_path)], {})
    lines: list[str] = []
    training = threading.Event()

    def read():
        for line in launcher.stdout:
            lines.append(line)
            if "[worker 0] Epoch 2/" in line:
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert training.wait(timeout=240), "".join(lines[-30:])
        victim = int(re.search(r"Started worker 1 \(pid (\d+)", "".join(lines)).group(1))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        code = launcher.wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    print(f"kill -9 of worker 1: the launcher exited {code} after {elapsed:.1f} s")
    assert code != 0
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert "error: worker 1 was killed by SIGKILL" in output
    assert not list(tmp_path.glob("launch_*.yaml"))


SIGTERM_AFTER_CONNECTING = """
import json, os, signal, sys, time
heard = []
signal.signal(signal.SIGTERM, lambda *_: heard.append(1))
import tensorflow as tf
from launcher.cluster import read_tf_config
from launcher.strategy import make_strategy
from resnet18.config import RuntimeConfig
from resnet18.runtime.preemption import notice_taken_by_tensorflow
if sys.argv[1] == "launcher":
    make_strategy(RuntimeConfig(strategy="multi_worker"), read_tf_config())
else:
    tf.distribute.MultiWorkerMirroredStrategy()
before = notice_taken_by_tensorflow()
rank = read_tf_config().task_index
open(f"{sys.argv[2]}.{rank}", "w").close()
if rank == 1:  # once worker 0 has looked too: a loaded worker 0 saw worker 1's notice "before"
    while not os.path.exists(f"{sys.argv[2]}.0"):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
time.sleep(3)  # TensorFlow's notifier looks for its flag once a second, then records the key
print(json.dumps({"heard": len(heard), "before": before, "after": notice_taken_by_tensorflow()}), flush=True)
"""


@pytest.mark.parametrize("made_by", ["launcher", "tensorflow"])
def test_a_sigterm_after_the_group_forms_reaches_the_python_handler(made_by, tmp_path):
    # The coordination service installs a SIGTERM handler of its own as MultiWorkerMirroredStrategy connects;
    # it swallowed every notice a worker got before training (the soak found such a worker training to the
    # end). The launcher's strategy takes the signal back; a notice TensorFlow took is read from its key.
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = [subprocess.Popen(
        [sys.executable, "-c", SIGTERM_AFTER_CONNECTING, made_by, str(tmp_path / "looked")], cwd=REPO,
        stdout=subprocess.PIPE, text=True,
        env=environment_without_cluster(TF_CONFIG=json.dumps({"cluster": cluster,
                                                               "task": {"type": "worker", "index": rank}})))
        for rank in range(2)]
    said = [json.loads(process.communicate(timeout=120)[0].strip().splitlines()[-1]) for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    if made_by == "launcher":
        assert said == [{"heard": 0, "before": False, "after": False}, {"heard": 1, "before": False, "after": False}]
    else:  # TensorFlow's handler in place: Python never hears of it, the key tells every worker
        assert said == [{"heard": 0, "before": False, "after": True}, {"heard": 0, "before": False, "after": True}]


@pytest.mark.parametrize("tf_config, words", [
    ("{oops", ["TF_CONFIG is not valid JSON"]),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 5}}),
     ["out of range"]),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]},
                 "task": {"type": "worker", "index": 0}}),
     ['["ps"]']),
])
def test_bad_tf_config_exits_2_before_tensorflow_starts(tf_config, words):
    result = run_launcher("--job", TINY_JOB, env={"TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "0"}, timeout=60)
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr
    assert "oneDNN" not in result.stderr and "cuda" not in result.stderr.lower()  # TensorFlow never loaded


def test_dry_run_in_cluster_mode_names_role_and_chief():
    cluster = {"chief": ["10.1.0.1:2222"], "worker": ["10.1.0.2:2222", "10.1.0.3:2222"]}
    tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    result = run_launcher("--job", TINY_JOB, "--dry_run", env={"TF_CONFIG": tf_config}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "role: worker 1 (rank 2 of 3, not chief)" in result.stdout
    assert "chief: 10.1.0.1:2222" in result.stdout


@pytest.mark.parametrize("nodelist, tasks_per_node, rank, expected_index, expected_address", [
    ("gpu[01-02]", "2(x2)", 3, 3, "gpu02:8889"),
    ("a1,b[7-8]", "1,2(x2)", 2, 2, "b7:8889"),
])
def test_slurm_tf_config_is_valid(nodelist, tasks_per_node, rank, expected_index, expected_address):
    tasks = sum(int(part.split("(")[0]) * (int(part.split("x")[1][:-1]) if "x" in part else 1)
                for part in tasks_per_node.split(","))
    env = {"SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_ID": "77",
           "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_PROCID": str(rank), "LAUNCHER_SLURM_PORT_BASE": "8888"}
    spec = parse_tf_config(json.loads(tf_config_from_slurm(env)))
    assert spec.task_index == expected_index and spec.num_tasks == tasks
    assert spec.cluster["worker"][rank] == expected_address
    assert tf_config_from_slurm({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) is None


def slurm_addresses(job_id: str, **extra: str) -> set[str]:
    """The addresses of a job of 2 nodes x 2 tasks (those of one node: what another job there could take)."""
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_PROCID": "0", "SLURM_JOB_ID": job_id, **extra}
    return set(parse_tf_config(json.loads(tf_config_from_slurm(env))).cluster["worker"])


def test_slurm_jobs_sharing_a_node_listen_on_ports_of_their_own():
    """Two jobs on one GPU node (4 GPUs each of 8) took the same fixed port: the second exited 98. Each job's
    ports now come from its job id, below the kernel's ephemeral range (what outgoing connections take)."""
    jobs = [slurm_addresses(str(job_id)) for job_id in (4242, 4243, 5000, 123456789)]
    assert all(not first & second for number, first in enumerate(jobs) for second in jobs[number + 1:]), jobs
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="utf-8") as stream:
        ephemeral_low = int(stream.read().split()[0])
    ports = {int(address.rpartition(":")[2]) for addresses in jobs for address in addresses}
    assert min(ports) >= 1024 and max(ports) < ephemeral_low, sorted(ports)
    assert slurm_addresses("4242") == slurm_addresses("4242")  # every task of the job (and a requeue) agrees
    assert slurm_addresses("4242", LAUNCHER_SLURM_PORT_BASE="9000") == {
        "gpu01:9000", "gpu01:9001", "gpu02:9000", "gpu02:9001"}


def test_more_slurm_tasks_on_a_node_than_a_job_id_has_ports_for_is_refused():
    env = {"SLURM_STEP_NUM_TASKS": "17", "SLURM_STEP_NODELIST": "cpu01", "SLURM_STEP_TASKS_PER_NODE": "17",
           "SLURM_PROCID": "0", "SLURM_JOB_ID": "4242"}
    with pytest.raises(SetupError, match="17 tasks on one node take more than the 16 ports"):
        tf_config_from_slurm(env)
    assert tf_config_from_slurm({**env, "LAUNCHER_SLURM_PORT_BASE": "20000"})  # a range of one's own: fine


@pytest.mark.parametrize("base", ["88a8", "80", "65535"])
def test_a_bad_slurm_port_base_is_refused_naming_the_variable(base):
    with pytest.raises(SetupError, match=f"LAUNCHER_SLURM_PORT_BASE={base}: "):
        slurm_addresses("4242", LAUNCHER_SLURM_PORT_BASE=base)
