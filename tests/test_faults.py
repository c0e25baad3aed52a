"""Faults survived, nothing lost: real kills, signals and damaged checkpoints.

Every run here is a real process (or group of processes on 127.0.0.1) training the
tiny job with checkpoints every 4 steps (10 steps per epoch). Deterministic mode
makes "nothing lost, nothing seen twice" checkable bit for bit: a run that is
killed and resumed must end with exactly the weights of one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from launcher.processes import free_ports
from launcher.status import collect
from resnet18.runtime.status import read_events
from tests.conftest import TINY_JOB, run_launcher
from tests.processes import Running

pytestmark = pytest.mark.slow  # real kills and restarts of training processes

STEPS = 30  # 3 epochs x 10 steps
FINGERPRINT = re.compile(r"Final weights sha256 ([0-9a-f]{64})")


def job_args(data_dir: str, workdir, *extra: str) -> list[str]:
    return ["--job", TINY_JOB, "--workdir", str(workdir), "--set", f"data.data_dir={data_dir}", "train.epochs=3",
            "train.checkpoint_every_steps=4", "train.steps_per_loop=2", "train.deterministic=true", *extra]


def fingerprints(text: str) -> list[str]:
    return FINGERPRINT.findall(text)


def summary(workdir) -> dict:
    return json.loads((workdir / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference_one_device(tiny_data_dir, tmp_path_factory):
    """The uninterrupted deterministic one-device run every fault run must reproduce."""
    workdir = tmp_path_factory.mktemp("reference_one_device")
    result = run_launcher(*job_args(tiny_data_dir, workdir, "--strategy", "one_device"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return fingerprints(result.stdout)[0]


@pytest.fixture(scope="module")
def reference_two_workers(tiny_data_dir, tmp_path_factory):
    """The uninterrupted run of two workers: that of two replicas in one process, which train bit for bit
    what two workers do (tests/test_multi_worker.py), in one TensorFlow process, not two."""
    workdir = tmp_path_factory.mktemp("reference_two_workers")
    result = run_launcher(*job_args(tiny_data_dir, workdir, "--cpu_replicas", "2"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (weights,) = fingerprints(result.stdout)
    return weights


def test_deterministic_runs_are_bitwise_identical(tiny_data_dir, tmp_path, reference_one_device):
    again = run_launcher(*job_args(tiny_data_dir, tmp_path, "--strategy", "one_device"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert fingerprints(again.stdout) == [reference_one_device]


def test_preempted_one_device_run_resumes_bit_for_bit(tiny_data_dir, tmp_path, reference_one_device):
    run = Running(job_args(tiny_data_dir, tmp_path, "--strategy", "one_device"))
    run.wait_for(r"^Checkpoint at step 12:")
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 138, run.output[-3000:]
    saved = int(re.search(r"preempted \(SIGTERM\): checkpoint saved at step (\d+)", run.output).group(1))
    assert 12 <= saved < STEPS
    assert f"Checkpoint at step {saved}:" in run.output
    again = run_launcher(*job_args(tiny_data_dir, tmp_path, "--strategy", "one_device"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {saved}/{STEPS}" in again.stdout  # no step lost
    assert summary(tmp_path)["steps"] == STEPS and summary(tmp_path)["resumed_from_step"] == saved
    assert fingerprints(again.stdout) == [reference_one_device]


def test_notices_after_the_first_do_not_change_a_preempted_runs_exit_code(tiny_data_dir, tmp_path):
    """More SIGTERMs may follow the first: a second notice, or srun ending the step (--kill-on-bad-exit) once
    a peer exited 138. None may turn a saved preemption (138) into a death by signal (143: Python resets its
    handlers to the default action while it finalizes) or a traceback (1) while TensorFlow tears down."""
    run = Running(job_args(tiny_data_dir, tmp_path, "--strategy", "one_device"))
    run.wait_for(r"^Checkpoint at step 4:")
    while run.process.poll() is None:  # from the first notice to the process's very end
        run.process.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    assert run.finish() == 138, run.output[-3000:]
    assert "preempted (SIGTERM): checkpoint saved at step" in run.output and "Traceback" not in run.output


def test_killed_two_replica_run_resumes_bit_for_bit(tiny_data_dir, tmp_path, reference_two_workers):
    args = job_args(tiny_data_dir, tmp_path / "run", "--cpu_replicas", "2")
    run = Running(args)
    run.wait_for(r"^Checkpoint at step 16:")
    run.process.kill()
    run.finish()
    again = run_launcher(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = summary(tmp_path / "run")["resumed_from_step"]
    assert 16 <= resumed < STEPS and summary(tmp_path / "run")["steps"] == STEPS
    assert fingerprints(again.stdout) == [reference_two_workers]


def test_kill_9_mid_epoch_restarts_the_group_and_ends_exactly(tiny_data_dir, tmp_path, reference_two_workers):
    run = Running(["--workers", "2", "--max_restarts", "2", *job_args(tiny_data_dir, tmp_path)])
    run.wait_for(r"Checkpoint at step 12:")  # inside epoch 2
    victim = int(run.wait_for(r"Started worker 1 \(pid (\d+)").group(1))
    os.kill(victim, signal.SIGKILL)
    assert run.finish() == 0, run.output[-4000:]
    assert "worker 1 was killed by SIGKILL: killed (retryable)" in run.output
    assert "Restarting the group from the latest checkpoint (1/2)" in run.output
    resumed = summary(tmp_path)["resumed_from_step"]
    assert 12 <= resumed < STEPS and summary(tmp_path)["steps"] == STEPS
    # Same final weights as the run that never stopped: no example seen twice or skipped.
    assert set(fingerprints(run.output)) == {reference_two_workers}


def test_kill_of_the_chief_right_after_a_save_loses_nothing_saved(tiny_data_dir, tmp_path, reference_two_workers):
    run = Running(["--workers", "2", "--max_restarts", "1", *job_args(tiny_data_dir, tmp_path)])
    chief = int(run.wait_for(r"Started worker 0 \(pid (\d+)").group(1))
    saved = int(run.wait_for(r"\[worker 0\] Checkpoint at step (8|12|16):").group(1))
    os.kill(chief, signal.SIGKILL)
    assert run.finish() == 0, run.output[-4000:]
    assert summary(tmp_path)["resumed_from_step"] >= saved
    assert set(fingerprints(run.output)) == {reference_two_workers}


def test_sigterm_to_one_worker_stops_all_at_one_step_and_resume_loses_none(tiny_data_dir, tmp_path,
                                                                          reference_two_workers):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = job_args(tiny_data_dir, tmp_path)

    def start_group() -> list[Running]:
        return [Running(args, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
                for i in range(2)]

    group = start_group()
    group[0].wait_for(r"^Checkpoint at step 8:")
    group[1].process.send_signal(signal.SIGTERM)
    codes = [member.finish(timeout=120) for member in group]
    assert codes == [138, 138], group[0].output[-2000:] + group[1].output[-2000:]
    steps = {int(re.search(r"checkpoint saved at step (\d+)", member.output).group(1)) for member in group}
    assert len(steps) == 1  # both workers saved at the same, agreed step
    (saved,) = steps
    relaunched = start_group()
    assert [member.finish() for member in relaunched] == [0, 0], relaunched[0].output[-3000:]
    assert f"at step {saved}/{STEPS}" in relaunched[0].output
    assert summary(tmp_path)["resumed_from_step"] == saved and summary(tmp_path)["steps"] == STEPS
    # Exactly the weights of the 2-worker run that never stopped: nothing lost, nothing seen twice.
    assert {fingerprints(member.output)[0] for member in relaunched} == {reference_two_workers}


def test_frozen_peer_is_detected_within_60_seconds(tiny_data_dir, tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = job_args(tiny_data_dir, tmp_path, "train.epochs=200")
    group = [Running(args, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    try:
        group[0].wait_for(r"^Checkpoint at step 8:")
        group[1].process.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        code = group[0].finish(timeout=90)
        detected_after = time.monotonic() - frozen_at
    finally:
        group[1].process.kill()  # SIGKILL ends a stopped process too
        group[1].finish(timeout=30)
    print(f"frozen peer: the other worker exited {code} after {detected_after:.1f} s")
    assert code == 138, group[0].output[-2000:]
    assert detected_after < 60, f"{detected_after:.0f} s"
    assert "lost contact with another worker" in group[0].output


# What the frozen-task tests give --frozen_after: half the default, still well above a healthy file's age.
FROZEN_AFTER = 30


def test_a_worker_frozen_before_the_group_forms_is_killed_and_the_group_restarts(tiny_data_dir, tmp_path,
                                                                                   reference_two_workers):
    """Frozen (SIGSTOP) as it starts, before it joins its peer: nothing in TensorFlow notices (the other worker
    waits for it to register, for up to an hour); the launcher sees its liveness file go stale, here after
    --frozen_after 30 s rather than the default 60."""
    run = Running(["--workers", "2", "--max_restarts", "1", "--frozen_after", str(FROZEN_AFTER),
                   *job_args(tiny_data_dir, tmp_path)])
    victim = int(run.wait_for(r"Started worker 1 \(pid (\d+)").group(1))
    os.kill(victim, signal.SIGSTOP)
    try:
        assert run.finish(timeout=240) == 0, run.output[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    silent = re.search(r"worker 1 was killed by SIGKILL: killed \(retryable\) \(no sign of life for (\d+) s: frozen\)",
                       run.output)
    assert silent and FROZEN_AFTER <= int(silent.group(1)) < FROZEN_AFTER + 5, run.output[-3000:]
    failed = [event for event in read_events(str(tmp_path)) if event["event"] == "group_failed"]
    assert [event["task"] for event in failed] == ["worker 1"], failed
    assert set(fingerprints(run.output)) == {reference_two_workers}


@contextlib.contextmanager
def leader_stopped_while_worker_1_waits(run: Running, workdir) -> Iterator[int]:
    """Stops worker 0 (the group's leader) as it starts, until worker 1 says it waits for the group; yields
    worker 0's pid, and kills worker 0 on the way out whatever the test did."""
    leader = int(run.wait_for(r"Started worker 0 \(pid (\d+)").group(1))
    os.kill(leader, signal.SIGSTOP)
    try:
        alive = workdir / "logs" / "worker-1.alive"
        deadline = time.monotonic() + 120
        while not alive.exists() or not alive.read_text().startswith("waiting for the group"):
            assert time.monotonic() < deadline, run.output[-3000:]
            time.sleep(0.1)
        yield leader
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leader, signal.SIGKILL)


def test_the_frozen_leader_is_blamed_not_the_worker_waiting_for_it(tiny_data_dir, tmp_path, reference_two_workers):
    """Worker 1 waits for worker 0 (the coordination service's leader) to form the group; TensorFlow holds
    worker 1's GIL meanwhile, so its liveness file goes stale too, and before worker 0's when worker 0 froze
    later. Found by the long soak (seed 798727), which saw the waiting worker 1 blamed and killed."""
    run = Running(["--workers", "2", "--max_restarts", "1", "--frozen_after", str(FROZEN_AFTER),
                   *job_args(tiny_data_dir, tmp_path)])
    with leader_stopped_while_worker_1_waits(run, tmp_path) as leader:
        time.sleep(2)  # worker 1's file is now older than any touch of worker 0's below
        os.kill(leader, signal.SIGCONT)
        time.sleep(1.5)  # worker 0 touches its file, still importing
        os.kill(leader, signal.SIGSTOP)
        assert run.finish(timeout=240) == 0, run.output[-4000:]
    failed = [event for event in read_events(str(tmp_path)) if event["event"] == "group_failed"]
    assert [event["task"] for event in failed] == ["worker 0"], failed
    assert set(fingerprints(run.output)) == {reference_two_workers}


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (the SigCgt mask of /proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="utf-8") as stream:
        caught = next(int(line.split()[1], 16) for line in stream if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_a_worker_waiting_for_a_preempted_peer_is_not_given_the_grace(tiny_data_dir, tmp_path,
                                                                       reference_two_workers):
    """Worker 0 is preempted (138) before the group formed while worker 1 waits for it in the strategy,
    where TensorFlow holds worker 1's GIL: its SIGTERM handler cannot run, and it has nothing to save.
    Found by the long soak (seed 643753): the restart came only when the preemption grace ran out."""
    grace = 120
    run = Running(["--workers", "2", "--max_restarts", "1", "--preemption_grace", str(grace),
                   *job_args(tiny_data_dir, tmp_path)])
    with leader_stopped_while_worker_1_waits(run, tmp_path) as leader:
        os.kill(leader, signal.SIGCONT)
        deadline = time.monotonic() + 120
        while not catches_sigterm(leader):  # its "nothing to save yet" handler, set long before the strategy
            assert time.monotonic() < deadline, run.output[-3000:]
            time.sleep(0.005)
        os.kill(leader, signal.SIGTERM)
        preempted = time.monotonic()
        run.wait_for(r"Restarting the group")
        waited = time.monotonic() - preempted
        assert run.finish(timeout=240) == 0, run.output[-4000:]
    failed = [event for event in read_events(str(tmp_path)) if event["event"] == "group_failed"]
    assert [(event["task"], event["exit_code"]) for event in failed] == [("worker 0", 138)], failed
    # Without the immediate kill the restart waits the whole grace; with it, a poll and a process exit.
    assert waited < 30, (waited, run.output[-3000:])
    assert set(fingerprints(run.output)) == {reference_two_workers}


def test_crash_loop_exhausts_max_restarts_and_reports(tiny_data_dir, tmp_path):
    run = Running(["--workers", "2", "--max_restarts", "2", *job_args(tiny_data_dir, tmp_path)])
    killed = 0
    start = 0
    for _ in range(3):  # the first attempt and two restarts: kill worker 1 each time
        match = run.wait_for(r"Started worker 1 \(pid (\d+)", start=start)
        start = next(i for i, line in enumerate(run.lines) if match.group(0) in line) + 1
        os.kill(int(match.group(1)), signal.SIGKILL)
        killed += 1
    code = run.finish()
    assert killed == 3 and code == 1, run.output[-3000:]
    assert run.output.count("Starting 2 local worker(s)") == 3
    assert "giving up after 2 restart(s); last failure: worker 1 was killed by SIGKILL" in run.output


def test_nan_loss_exits_1_keeps_checkpoints_and_is_not_retried(tiny_data_dir, tmp_path):
    first = run_launcher(*job_args(tiny_data_dir, tmp_path, "train.epochs=1"))
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    result = run_launcher("--workers", "2", "--max_restarts", "2",
                          *job_args(tiny_data_dir, tmp_path, "train.learning_rate=1.0e+30", "train.lr_scaling=none"))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"loss is (nan|inf) in steps \d+-\d+", result.stdout)
    assert "not retryable" in result.stderr and "Restarting" not in result.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    assert collect(str(tmp_path))["state"] == "failed"  # what launcher.status says of the crashed run


def corrupt_latest_and_resume(tiny_data_dir, workdir, damage) -> subprocess.CompletedProcess:
    first = run_launcher(*job_args(tiny_data_dir, workdir, "train.epochs=2"))
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = workdir / "checkpoints"
    assert (checkpoints / "ckpt-20.index").exists() and (checkpoints / "ckpt-16.index").exists()
    damage(checkpoints)
    return run_launcher(*job_args(tiny_data_dir, workdir))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda d: (d / "ckpt-20.data-00000-of-00001").write_bytes(
        (d / "ckpt-20.data-00000-of-00001").read_bytes()[:1000]), id="truncated-data"),
    pytest.param(lambda d: ((d / "ckpt-20.index").write_bytes(os.urandom(300)),
                            (d / "checkpoint").write_text("garbage {{{")), id="garbage-index-and-state"),
])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_data_dir, tmp_path, damage):
    result = corrupt_latest_and_resume(tiny_data_dir, tmp_path, damage)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "warning: checkpoint" in result.stdout and "ckpt-20 is unreadable" in result.stdout
    assert summary(tmp_path)["resumed_from_step"] == 16 and summary(tmp_path)["steps"] == STEPS


def test_stale_temporary_from_an_interrupted_save_is_ignored_and_removed(tiny_data_dir, tmp_path):
    def leave_partial_save(checkpoints):
        # What a crash inside CheckpointManager.save leaves: shards in a _temp directory,
        # not yet renamed, and the state file still naming the previous checkpoint.
        partial = checkpoints / "ckpt-24_temp" / "part-00000-of-00001"
        partial.parent.mkdir()
        partial.write_bytes(os.urandom(100))
        # And the copy of history.jsonl a writer on this machine, since gone, was killed writing.
        copy = checkpoints.parent / f"history.jsonl.{socket.gethostname()}.{gone.pid}.7.tmp"
        copy.write_text('{"epo')
        os.utime(copy, (time.time() - 3600,) * 2)  # an hour ago: abandoned, not a copy in use

    gone = subprocess.Popen(["true"])
    gone.wait()
    result = corrupt_latest_and_resume(tiny_data_dir, tmp_path, leave_partial_save)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left by an interrupted save" in result.stdout
    assert summary(tmp_path)["resumed_from_step"] == 20
    assert not (tmp_path / "checkpoints" / "ckpt-24_temp").exists()
    assert not list(tmp_path.glob("*.tmp")), "a killed writer's copy of history.jsonl was left"


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tiny_data_dir, tmp_path):
    def destroy_all(checkpoints):
        for path in checkpoints.glob("ckpt-*.index"):
            path.write_bytes(b"not a checkpoint")

    result = corrupt_latest_and_resume(tiny_data_dir, tmp_path, destroy_all)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "no checkpoint in" in result.stderr and "can be read" in result.stderr


def test_sigterm_to_the_launcher_is_forwarded_and_never_retried(tiny_data_dir, tmp_path):
    run = Running(["--workers", "2", "--max_restarts", "3", *job_args(tiny_data_dir, tmp_path)])
    run.wait_for(r"\[worker 0\] Checkpoint at step 8:")
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == 138, run.output[-3000:]
    saved = set(re.findall(r"\[worker (\d)\] error: preempted \(SIGTERM\): checkpoint saved at step (\d+)", run.output))
    assert {rank for rank, _ in saved} == {"0", "1"} and len({step for _, step in saved}) == 1
    assert "stopped by SIGTERM" in run.output and "Restarting" not in run.output
    assert run.output.count("Starting 2 local worker(s)") == 1


def test_sigterm_to_the_launcher_as_its_workers_start_is_a_preemption(tiny_data_dir, tmp_path):
    # Forwarded before a worker's interpreter has installed its handler, the signal's default action kills it:
    # it was starting and had nothing to save, so the launcher's own exit is still 138 (found by the soak).
    run = Running(["--workers", "2", "--max_restarts", "3", *job_args(tiny_data_dir, tmp_path)])
    run.wait_for(r"Started worker 1 ")
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == 138, run.output[-3000:]
    assert "stopped by SIGTERM" in run.output and "Restarting" not in run.output


def unscheduled_step_args(tiny_data_dir, layout: str) -> list[str]:
    """Checkpoints at epoch ends only, one step per call, 40 steps per epoch, two replicas in `layout`."""
    return ["--job", TINY_JOB, "--set", f"data.data_dir={tiny_data_dir}", "train.epochs=2",
            "train.global_batch_size=16", "train.checkpoint_every_steps=0", "train.steps_per_loop=1",
            "train.deterministic=true", layout, "2"]


@pytest.fixture(scope="module")
def reference_unscheduled_step(tiny_data_dir, tmp_path_factory):
    """The uninterrupted run of both layouts: two workers train bit for bit what two replicas do
    (tests/test_multi_worker.py), so the cheaper one-process run serves both."""
    workdir = tmp_path_factory.mktemp("reference_unscheduled_step")
    result = run_launcher(*unscheduled_step_args(tiny_data_dir, "--cpu_replicas"), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return set(fingerprints(result.stdout))


@pytest.mark.parametrize("layout", ["--cpu_replicas", "--workers"])
def test_a_preemption_at_an_unscheduled_step_resumes_bit_for_bit(tiny_data_dir, tmp_path, layout,
                                                                  reference_unscheduled_step):
    # A SIGTERM sent as epoch 2 starts is acted on a few steps in, where the uninterrupted run saves nothing.
    # Every save used to pool the replicas' batch-norm statistics into each replica: here that pooling
    # happened in one run only.
    args = unscheduled_step_args(tiny_data_dir, layout)
    run = Running([*args, "--workdir", str(tmp_path / "run")])
    run.wait_for(r"Epoch 2/2")
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 138, run.output[-3000:]
    saved = {int(step) for step in re.findall(r"checkpoint saved at step (\d+)", run.output)}
    assert len(saved) == 1 and 40 < min(saved) < 80, saved  # one agreed step, neither an epoch end nor scheduled
    again = run_launcher(*args, "--workdir", str(tmp_path / "run"))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert summary(tmp_path / "run")["resumed_from_step"] == saved.pop()
    assert set(fingerprints(again.stdout)) == reference_unscheduled_step
