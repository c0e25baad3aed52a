"""A real Slurm: the repository's jobs/slurm_multiworker.sbatch submitted with sbatch to a throwaway
two-node cluster (jobs/slurm_local_cluster.sh: Debian's slurm-wlm and munge, slurmctld and one slurmd
per node, node 2 in a network namespace of its own), as a user submits it.

- Both tasks train as one MultiWorkerMirroredStrategy group: 2 replicas, identical final weights.
- Preemption the way Slurm does it: `scancel --signal=TERM` reaches every task, they checkpoint and exit
  138, the script requeues the job, the requeued job resumes and ends with the uninterrupted weights.
- `kill -9` of one task's process ends the job step (137), the job is requeued and resumes the same way.
- A bad config exits 2 and is not requeued.

The weights are compared bitwise: train.deterministic, and the same examples reach the same replica
whatever the restarts (the data order is a function of the step).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from launcher.cluster import environment_without_cluster
from launcher.processes import free_ports
from tests.conftest import REPO, TINY_JOB, server_missing

CLUSTER = os.path.join(REPO, "jobs", "slurm_local_cluster.sh")
SBATCH = os.path.join(REPO, "jobs", "slurm_multiworker.sbatch")
FINGERPRINT = re.compile(r"^Final weights sha256 ([0-9a-f]{64})$", re.M)


@dataclasses.dataclass
class Slurm:
    conf: str
    root: str

    def run(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(command, env=dict(os.environ, SLURM_CONF=self.conf), capture_output=True,
                                text=True, timeout=60)
        assert not check or result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", job_id, "--oneliner")
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float = 240) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            assert time.monotonic() < deadline, f"job {job_id} is {job['JobState']}, not {states}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm():
    if not all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        server_missing("Slurm (Debian's slurm-wlm and munge)")
    if os.geteuid() != 0:
        pytest.skip("the throwaway cluster runs its daemons as root")
    root = tempfile.mkdtemp(prefix="slurm_cluster_")
    env = dict(os.environ, SLURM_LOCAL_NO_INSTALL="1", SLURM_LOCAL_KILLWAIT="10")
    started = subprocess.run(["bash", CLUSTER, "start", root], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield Slurm(started.stdout.strip().removeprefix("export SLURM_CONF="), root)
    finally:
        subprocess.run(["bash", CLUSTER, "stop", root], env=env, capture_output=True, timeout=180)
        shutil.rmtree(root, ignore_errors=True)


# A job's final states. sbatch --wait returns when the job's tasks have ended, which on a loaded machine
# can be while the job is still COMPLETING (seen: a bad-config job read COMPLETING, not FAILED).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def submit(slurm: Slurm, tmp_path, data_dir: str, *sets: str, wait: bool = False) -> tuple[str, str]:
    """sbatch jobs/slurm_multiworker.sbatch for the tiny job; (job id, its output file)."""
    output = str(tmp_path / "job.out")
    env = environment_without_cluster()
    env.update(SLURM_CONF=slurm.conf, PYTHON=os.path.join(os.path.dirname(os.sys.executable), "python"),
               JOB=TINY_JOB, WORKDIR=str(tmp_path / "run"), LAUNCHER_SLURM_PORT_BASE=str(free_ports(1)[0]),
               SET=" ".join([f"data.data_dir={data_dir}", "train.deterministic=true", "train.epochs=3", *sets]),
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(["sbatch", "--parsable", f"--output={output}", f"--chdir={REPO}",
                             *(["--wait"] if wait else []), SBATCH], env=env, capture_output=True, text=True,
                            timeout=600)
    job_id = result.stdout.strip().split(";")[0]
    assert job_id.isdigit(), result.stdout + result.stderr
    return job_id, output


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as stream:
        return stream.read()


def wait_for_line(path: str, pattern: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and re.search(pattern, read(path), re.M)):
        assert time.monotonic() < deadline, f"no {pattern!r} in {path}:\n" + (read(path)[-3000:]
                                                                               if os.path.exists(path) else "")
        time.sleep(0.5)


def resume_requeued(slurm: Slurm, job_id: str, output: str) -> dict[str, str]:
    """Waits for the requeued job's second start (Slurm starts it once its old credential expires:
    cred_expire, 10 s on the throwaway cluster), then for its end. Its states on the way are in the
    assertion message."""
    deadline = time.monotonic() + 240
    seen: list[str] = []
    while not re.search(rf"^job {job_id}, start 2,", read(output), re.M):
        job = slurm.job(job_id)
        state = f"{job['JobState']}/{job['Restarts']}/{job['ExitCode']}"
        seen += [state] if not seen or seen[-1] != state else []
        assert time.monotonic() < deadline and job["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED"), \
            f"job {job_id} did not start again; states {seen}:\n{read(output)[-2000:]}"
        time.sleep(0.5)
    return slurm.wait(job_id, ENDED, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(slurm, tiny_data_dir, tmp_path_factory):
    """The job run to its end without interruption: (its job record, its output)."""
    tmp_path = tmp_path_factory.mktemp("slurm_uninterrupted")
    job_id, output = submit(slurm, tmp_path, tiny_data_dir, wait=True)
    return slurm.wait(job_id, ENDED), read(output), tmp_path


@pytest.mark.slow
def test_two_tasks_on_two_nodes_train_as_one_group(uninterrupted):
    job, output, tmp_path = uninterrupted
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", output[-3000:]
    assert len(set(job["NodeList"].replace("[", ",").replace("]", "").split(","))) >= 2  # two nodes
    fingerprints = FINGERPRINT.findall(output)
    assert len(fingerprints) == 2 and len(set(fingerprints)) == 1, output[-3000:]  # both tasks, same weights
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"num_replicas": 2' in summary and '"strategy": "MultiWorkerMirroredStrategy"' in summary
    assert fingerprints[0] in summary


@pytest.mark.slow
def test_scancel_signal_term_checkpoints_requeues_and_resumes_to_the_same_weights(slurm, uninterrupted,
                                                                                tiny_data_dir, tmp_path):
    job_id, output = submit(slurm, tmp_path, tiny_data_dir)
    wait_for_line(output, r"^Checkpoint at step 10:")
    slurm.run("scancel", "--signal=TERM", job_id)  # what Slurm's --signal=TERM@N warning does
    job = resume_requeued(slurm, job_id, output)
    text = read(output)
    assert "srun exited 138: requeueing" in text, text[-3000:]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", job
    assert re.search(r"^Resuming from .*ckpt-\d+ at step \d+/30", text, re.M), text[-3000:]
    assert FINGERPRINT.findall(text)[-1] == FINGERPRINT.findall(uninterrupted[1])[0]


@pytest.mark.slow
def test_a_task_killed_ends_the_step_with_137_and_the_job_resumes(slurm, uninterrupted, tiny_data_dir, tmp_path):
    job_id, output = submit(slurm, tmp_path, tiny_data_dir)
    wait_for_line(output, r"^Checkpoint at step 10:")
    victim = task_pid(slurm, job_id, rank=1)
    os.kill(victim, 9)
    job = resume_requeued(slurm, job_id, output)
    text = read(output)
    assert "srun exited 137: requeueing" in text, text[-3000:]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", job
    assert FINGERPRINT.findall(text)[-1] == FINGERPRINT.findall(uninterrupted[1])[0]


def task_pid(slurm: Slurm, job_id: str, rank: int) -> int:
    """The launcher's Python process of task `rank` of the job (its environment says which). Its cluster's
    configuration too: under `pytest -n`, every worker runs a cluster of its own, each numbering jobs from 1."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as stream:
                environ = dict(item.split(b"=", 1) for item in stream.read().split(b"\0") if b"=" in item)
            with open(f"/proc/{entry}/cmdline", "rb") as stream:
                command = stream.read().split(b"\0")
        except OSError:
            continue
        if (environ.get(b"SLURM_JOB_ID") == job_id.encode() and environ.get(b"SLURM_PROCID") == str(rank).encode()
                and environ.get(b"SLURM_CONF") == slurm.conf.encode()
                and command[1:3] == [b"-m", b"launcher"]):  # Python itself, not the task's shell
            return int(entry)
    raise AssertionError(f"no task {rank} of job {job_id}")


@pytest.mark.slow
def test_a_bad_config_exits_2_and_is_not_requeued(slurm, tiny_data_dir, tmp_path):
    job_id, output = submit(slurm, tmp_path, tiny_data_dir, "train.epochs=-1", wait=True)
    job = slurm.wait(job_id, ENDED)
    text = read(output)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0" and job["Restarts"] == "0", text[-3000:]
    assert "error: " in text and "train.epochs" in text and "Traceback" not in text
    assert "exited 2: not requeued" in text


def test_a_launcher_started_in_the_batch_shell_runs_alone_not_as_a_group(slurm, tiny_data_dir, tmp_path):
    # The batch shell of a job with two tasks has SLURM_NTASKS=2, SLURM_PROCID=0 and the job's node list but
    # no srun step. A plain `python -m launcher` there built TF_CONFIG for both tasks, called itself worker 0
    # and waited for a group nobody else would join (a dry run shows the plan it would have trained with).
    output = str(tmp_path / "job.out")
    python = os.path.join(os.path.dirname(os.sys.executable), "python")
    command = (f"{python} -m launcher --job {TINY_JOB} --workdir {tmp_path / 'run'} "
               f"--set data.data_dir={tiny_data_dir} --dry_run")
    env = dict(environment_without_cluster(), SLURM_CONF=slurm.conf, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(["sbatch", "--parsable", "--wait", "--nodes=2", "--ntasks-per-node=1",
                             f"--output={output}", f"--chdir={REPO}", "--wrap", command], env=env,
                            capture_output=True, text=True, timeout=600)
    job = slurm.wait(result.stdout.strip().split(";")[0], ENDED)
    text = read(output)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-3000:]
    assert "TF_CONFIG from Slurm" not in text and "MultiWorkerMirroredStrategy" not in text, text[-3000:]
