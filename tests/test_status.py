"""launcher.status from files alone: when a running chief counts as stalled, runs without a test loss.

    python -m pytest tests/test_status.py
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from launcher.status import collect, render
from resnet18.config import Config, dump
from resnet18.runtime.files import write_json
from resnet18.runtime.status import HEARTBEAT_SECONDS, STARTUP_SECONDS, STATUS_FILE


def run_dir(tmp_path, step_timeout: float, state: str, age: float):
    config = yaml.safe_load(dump(Config()))
    config["train"]["step_timeout_seconds"] = step_timeout
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    write_json(str(tmp_path / STATUS_FILE), {"state": state, "step": 40, "epoch": 1, "total_steps": 100,
                                             "updated": time.time() - age})
    return str(tmp_path)


@pytest.mark.parametrize("step_timeout, state, age, stalled", [
    (1800, "training", 300, False),  # an evaluation of 5 minutes: healthy (this was "stalled" after 120 s)
    (1800, "training", 1800 + HEARTBEAT_SECONDS + 1, True),
    (60, "training", 300, True),
    (60, "starting", 300, False),  # compiling its first step: the watchdog does not time that
    (60, "starting", 60 + STARTUP_SECONDS + 1, True),
    (60, "compiling", 300, False),  # its first save or evaluation: untimed by the watchdog too
    (60, "compiling", 60 + STARTUP_SECONDS + 1, True),
    (0, "training", 10_000, False),  # no watchdog, no stall declared
])
def test_a_chief_is_stalled_only_past_what_its_own_watchdog_allows(tmp_path, step_timeout, state, age, stalled):
    result = collect(run_dir(tmp_path, step_timeout, state, age))
    assert result["state"].startswith("stalled") == stalled, result["state"]


def test_a_run_without_a_test_loss_is_shown(tmp_path):
    workdir = run_dir(tmp_path, 1800, "training", 1)
    (tmp_path / "history.jsonl").write_text(json.dumps(
        {"epoch": 1, "step": 10, "train_loss": 5.0, "train_accuracy": 0.1, "test_accuracy": 0.3,
         "knn_accuracy": 0.3}) + "\n")
    text = render(collect(workdir))
    assert "last evaluation: epoch 1: test_accuracy 0.3000\n" in text


@pytest.mark.parametrize("error, state, exit_code", [
    # The survivor of a killed peer: TensorFlow says Unavailable; the launcher exits 138 (this said failed, 1).
    (lambda tf: tf.errors.UnavailableError(None, None, "Graph execution error:\n\nCollective ops is aborted by: "
                                                       "task /job:worker/replica:0/task:1 heartbeat timeout"),
     "lost_peer", 138),
    (lambda tf: tf.errors.AbortedError(None, None, "oneDNN could not create a primitive"), "failed", 1),
    (lambda tf: tf.errors.InvalidArgumentError(None, None, "a bug"), "failed", 1),
])
def test_the_end_of_training_is_told_with_the_exit_code_the_launcher_gives(tmp_path, error, state, exit_code):
    import types

    import tensorflow as tf

    from resnet18.runtime.status import Heartbeat
    from resnet18.training.loop import _recorded

    heartbeat = Heartbeat(str(tmp_path), True, 100, 10)
    loop = types.SimpleNamespace(topology=types.SimpleNamespace(is_chief=True, task="worker 0", num_processes=2,
                                                                num_replicas=2),
                                 workdir=str(tmp_path), checkpointer=types.SimpleNamespace(skipped=[], removed=[]),
                                 heartbeat=heartbeat, heartbeat_step=lambda: 40)
    raised = error(tf)
    with pytest.raises(type(raised)):
        with _recorded(loop, 20):
            raise raised
    end = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()][-1]
    assert (end["event"], end["state"], end["exit_code"], end["step"]) == ("train_end", state, exit_code, 40)
    if state == "lost_peer":
        assert end["detail"].startswith("Collective ops is aborted by")  # the cause, not "Graph execution error:"
        (tmp_path / "config.yaml").write_text(dump(Config()))
        assert collect(str(tmp_path))["state"] == "lost a peer"


def test_the_chief_says_when_it_traces_a_call_its_watchdog_does_not_time(tmp_path):
    import types

    from resnet18.runtime.status import Heartbeat, read_status
    from resnet18.runtime.watchdog import Watchdog
    from resnet18.training.loop import Loop

    heartbeat = Heartbeat(str(tmp_path), True, 100, 10)
    heartbeat.beat(10, images=64, seconds=1.0)
    loop = types.SimpleNamespace(traced={"train"}, watchdog=Watchdog(0), heartbeat=heartbeat)
    with Loop.watching(loop, "save", "the checkpoint at step 10"):
        assert read_status(str(tmp_path))["state"] == "compiling"  # the first save: traced, untimed
    assert read_status(str(tmp_path))["state"] == "training"  # at once, not a heartbeat later
    heartbeat.beat(20, images=64, seconds=1.0, force=True)
    with Loop.watching(loop, "save", "the checkpoint at step 20"):
        assert read_status(str(tmp_path))["state"] == "training"  # timed from now on
    assert read_status(str(tmp_path))["step"] == 20


def test_a_resumed_chief_compiling_its_first_call_reports_the_step_it_resumed_at(tmp_path):
    import types

    from resnet18.runtime.status import Heartbeat, read_status
    from resnet18.runtime.watchdog import Watchdog
    from resnet18.training.loop import Loop

    heartbeat = Heartbeat(str(tmp_path), True, 100, 10, start_step=40)
    loop = types.SimpleNamespace(traced=set(), watchdog=Watchdog(0), heartbeat=heartbeat)
    with Loop.watching(loop, "train", "training steps 41-45"):
        status = read_status(str(tmp_path))
        assert (status["state"], status["step"], status["epoch"]) == ("compiling", 40, 4)


def test_a_group_that_failed_after_the_chief_last_wrote_is_failed_not_running(tmp_path):
    # The launcher stops a broken group with SIGKILL after 5 s: a chief blocked in a collective never writes
    # its end, so status.json still says training; the launcher's group_failed, written after it, is the truth.
    from resnet18.runtime.status import append_event

    workdir = run_dir(tmp_path, 1800, "training", 30)
    assert collect(workdir)["state"] == "running"
    append_event(workdir, {"event": "group_failed", "task": "worker-1", "exit_code": 1})
    assert collect(workdir)["state"] == "failed"
    write_json(str(tmp_path / STATUS_FILE), {"state": "training", "step": 50, "updated": time.time()})
    assert collect(workdir)["state"] == "running"  # a restarted group's chief writes after it


def _add_events(workdir: str, writer: int, count: int) -> None:
    from resnet18.runtime.status import append_event

    for number in range(count):
        append_event(workdir, {"event": "test", "writer": writer, "number": number})


def test_a_torn_event_line_is_skipped_quietly_and_the_rest_is_read(tmp_path, capsys):
    from resnet18.runtime.status import read_events

    (tmp_path / "events.jsonl").write_text('{"event": "a"}\n\n{"event": "b"}\n{"event": "c", "ti')
    assert read_events(str(tmp_path)) == [{"event": "a"}, {"event": "b"}]
    assert capsys.readouterr().err == ""  # status is watched every few seconds: a torn line is no news


def test_events_added_by_several_processes_at_once_are_all_kept(tmp_path):
    # The --workers launcher, the chief and the sidecar evaluator add to one events.jsonl. Rewritten whole
    # through one shared temporary name, one writer's rename took the other's file (FileNotFoundError, exit 1)
    # or an addition was lost (a restart miscounted, a failure's cause gone).
    import multiprocessing

    from resnet18.runtime.status import read_events

    context = multiprocessing.get_context("spawn")  # real processes, as the three writers are
    writers = [context.Process(target=_add_events, args=(str(tmp_path), writer, 150)) for writer in range(3)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    assert [process.exitcode for process in writers] == [0, 0, 0]
    added = sorted((event["writer"], event["number"]) for event in read_events(str(tmp_path)))
    assert added == [(writer, number) for writer in range(3) for number in range(150)]


@pytest.mark.parametrize("state, ended", [("lost_peer", "lost a peer"), ("preempted", "preempted"),
                                          ("failed", "failed")])
def test_a_group_starting_again_after_the_chief_ended_is_restarting(tmp_path, state, ended):
    # The restarted chief writes status.json only once it has imported TensorFlow, formed the group and
    # restored: until then status showed the last attempt's end, however many restarts were under way.
    from resnet18.runtime.status import append_event

    workdir = run_dir(tmp_path, 1800, state, 30)
    assert collect(workdir)["state"] == ended
    append_event(workdir, {"event": "group_failed", "task": "worker-1", "exit_code": 138})
    append_event(workdir, {"event": "group_start", "attempt": 1, "workers": 2})
    assert collect(workdir)["state"] == f"restarting (the last attempt's chief: {ended})"
    append_event(workdir, {"event": "evaluator_start"})  # a restarted evaluator writes before the chief does
    assert collect(workdir)["state"] == f"restarting (the last attempt's chief: {ended})"
    write_json(str(tmp_path / STATUS_FILE), {"state": "training", "step": 50, "updated": time.time()})
    assert collect(workdir)["state"] == "running"


def test_a_run_whose_evaluator_gave_up_is_not_simply_finished(tmp_path):
    # Training done, the sidecar evaluator given up on: the --workers launcher exits with the evaluator's code
    # (138 here) and says to run again; status said "finished", with no final accuracy and no hint.
    from resnet18.runtime.status import append_event

    workdir = run_dir(tmp_path, 1800, "done", 30)
    write_json(str(tmp_path / "summary.json"), {"test_accuracy": None, "steps": 100})
    assert collect(workdir)["state"] == "finished"
    append_event(workdir, {"event": "group_done", "workers": 2, "exit_code": 138,
                           "evaluator_failed": "evaluator exited 138 (lost the chief)"})
    assert collect(workdir)["state"] == ("finished, but the evaluator did not (exit 138: evaluator exited 138 (lost "
                                         "the chief)); run the same command again to evaluate the epochs it left")


def test_events_are_still_added_on_a_file_system_without_locks(tmp_path, monkeypatch):
    # NFSv3 without lockd answers flock with ENOLCK (Lustre mounted noflock, EINVAL or ENOSYS): every event, the
    # chief's train_start included, would raise and end the run with exit 1. There it adds without the lock.
    import errno
    import fcntl
    import os

    from resnet18.runtime import files
    from resnet18.runtime.status import append_event, read_events

    def flock_failing_with(code: int):
        def flock(stream, operation):
            raise OSError(code, os.strerror(code))
        return flock

    monkeypatch.setattr(fcntl, "flock", flock_failing_with(errno.ENOLCK))  # such a mount's answer; none is here
    append_event(str(tmp_path), {"event": "train_start", "step": 0})
    assert [event["event"] for event in read_events(str(tmp_path))] == ["train_start"]
    monkeypatch.setattr(fcntl, "flock", flock_failing_with(errno.EIO))
    with pytest.raises(OSError):
        files.append_text(str(tmp_path / "events.jsonl"), "x\n")  # any other failure is still an error


def test_temporary_copies_of_killed_writers_on_this_machine_are_removed_and_no_others(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    from resnet18.runtime import files

    target = str(tmp_path / "status.json")
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time; from resnet18.runtime import files; "
                               "open(files.temporary_name(sys.argv[1]), 'w').write('{half'); "
                               "print('written', flush=True); time.sleep(600)", target],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "written\n"
    writer.send_signal(signal.SIGKILL)  # mid-write: its copy is never renamed into place
    writer.wait()
    living = files.temporary_name(target)  # this process's: a writer still at work
    other_host = f"{target}.elsewhere-{socket.gethostname()}.{writer.pid}.1.tmp"  # whose pid says nothing here
    for path in (living, other_host, str(tmp_path / "notes.1.2.tmp")):
        open(path, "w").close()
    abandoned = [str(path) for path in tmp_path.glob(f"status.json.{socket.gethostname()}.{writer.pid}.*.tmp")]
    assert len(abandoned) == 1
    # Young, it may be another PID namespace's under the same host name: kept until it is old.
    assert files.remove_abandoned_temporaries(str(tmp_path)) == []
    for path in tmp_path.iterdir():
        os.utime(path, (time.time() - files.ABANDONED_AFTER_SECONDS - 1,) * 2)
    assert files.remove_abandoned_temporaries(str(tmp_path)) == abandoned
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        name.rsplit("/", 1)[1] for name in (living, other_host, str(tmp_path / "notes.1.2.tmp")))


def test_a_group_start_whose_chief_never_started_training_is_a_restart_too(tmp_path):
    # The --workers launcher's word: the first group failed before its chief wrote train_start (a worker died
    # while the group formed); the second trained. And a later plain run (by hand, or the cluster's restart).
    from resnet18.runtime.status import append_event

    workdir = run_dir(tmp_path, 1800, "done", 0)
    for event in ({"event": "group_start", "attempt": 0},
                  {"event": "group_failed", "cause": "worker 1 killed (retryable)", "error": "oom-killer"},
                  {"event": "group_start", "attempt": 1},
                  {"event": "group_failed", "cause": "worker 0 exited with code 98", "exit_code": 98},
                  {"event": "group_start", "attempt": 2},  # new ports: not a restart, the launcher says none
                  {"event": "train_start", "step": 0, "skipped_checkpoints": []},
                  {"event": "train_end", "state": "preempted", "detail": "SIGTERM at step 8"},
                  {"event": "group_failed", "cause": "worker 0 preempted"},
                  {"event": "train_start", "step": 8, "skipped_checkpoints": ["ckpt-8: unreadable"]},
                  {"event": "train_end", "state": "preempted", "detail": "SIGTERM at step 16"},
                  {"event": "group_start", "attempt": 0},  # the same --workers command again, by hand
                  {"event": "group_failed", "cause": "worker 1 exited with code 1", "exit_code": 1},
                  {"event": "train_start", "step": 16, "skipped_checkpoints": []},  # and a run without it
                  {"event": "train_end", "state": "done"}):
        append_event(workdir, event)
    restarts = collect(workdir)["restarts"]
    assert [(restart["step"], restart["cause"]) for restart in restarts] == [
        (0, "worker 1 killed (retryable): oom-killer"),
        (8, "worker 0 preempted; then skipped ckpt-8: unreadable"),
        (None, "preempted: SIGTERM at step 16"),
        (16, "worker 1 exited with code 1")]


def test_the_status_of_a_local_run_is_read_without_starting_tensorflow(tmp_path):
    """`watch -n 10 python -m launcher.status` should not start TensorFlow every time: seconds of CPU and
    its CUDA start-up lines on the operator's terminal, for a few small files a local path reads with os."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    workdir = run_dir(tmp_path, 1800, "training", 5)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["train"]["evaluation"] = "sidecar"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    for directory, step in (("checkpoints", 20), ("epoch_checkpoints", 10)):
        (tmp_path / directory).mkdir()
        for suffix in (".index", ".data-00000-of-00001"):
            (tmp_path / directory / f"ckpt-{step}{suffix}").write_text("")
    os.utime(tmp_path / "checkpoints" / "ckpt-20.index", (time.time() - 100,) * 2)
    (tmp_path / "history.jsonl").write_text(json.dumps({"epoch": 1, "step": 10, "test_accuracy": 0.25}) + "\n")
    script = ("import json, sys; from launcher import status; status.main(['--workdir', sys.argv[1], '--json']); "
              "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] == 'tensorflow')))")
    result = subprocess.run([sys.executable, "-c", script, workdir], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    printed, imported = result.stdout.rsplit("\n", 2)[0], json.loads(result.stdout.rsplit("\n", 2)[1])
    assert imported == []
    shown = json.loads(printed)
    assert shown["last_checkpoint"]["step"] == 20 and 99 < shown["last_checkpoint"]["age_seconds"] < 160
    assert shown["awaiting_evaluator"] == 1 and shown["last_evaluation"]["test_accuracy"] == 0.25


@pytest.mark.parametrize("text", ["train: [oops\n", "- a\n- b\n", "train: 5\n",
                                  "train:\n  step_timeout_seconds: soon\n", "train:\n  step_timeout_seconds: -5\n"])
def test_status_and_report_name_a_damaged_config_yaml_and_exit_2(tmp_path, capsys, text):
    """A hand-edited config.yaml was a PyYAML, AttributeError or ValueError traceback (exit 1) in both."""
    from launcher import report, status

    (tmp_path / "config.yaml").write_text(text)
    write_json(str(tmp_path / "summary.json"), {"test_accuracy": 0.5})
    for main in (status.main, report.main):
        assert main(["--workdir", str(tmp_path)]) == 2, (main.__module__, text)
        error = capsys.readouterr().err
        assert error.startswith("error: ") and str(tmp_path / "config.yaml") in error, (main.__module__, error)
