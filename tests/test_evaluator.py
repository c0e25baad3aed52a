"""When the sidecar evaluator gives up on the chief: real status.json files, no processes.

    python -m pytest tests/test_evaluator.py
"""

from __future__ import annotations

import time

import pytest

from resnet18.runtime.errors import RetryableError, TrainingError
from resnet18.training.evaluator import CHIEF_STARTUP_SECONDS, check_chief
from resnet18.runtime.files import write_json
from resnet18.runtime.status import HEARTBEAT_SECONDS, STATUS_FILE

TIMEOUT = 5.0  # train.step_timeout_seconds, as tests/test_operations.py sets it


def write_status(workdir, state: str, age: float) -> None:
    write_json(str(workdir / STATUS_FILE), {"state": state, "updated": time.time() - age})


def test_a_chief_still_starting_is_not_lost_after_one_step_timeout(tmp_path):
    # The evaluator started 3 timeouts ago; the chief (its status is from an earlier run) is
    # still tracing and compiling its first step, which its own watchdog does not time either.
    # The old check counted from the evaluator's start and gave up here (seen on 2 cores under
    # ONEDNN_MAX_CPU_ISA=AVX2, where start-up is slower).
    write_status(tmp_path, "training", age=3600)
    check_chief(str(tmp_path), TIMEOUT, started=time.time() - 3 * TIMEOUT)
    with pytest.raises(RetryableError, match="lost the chief"):
        check_chief(str(tmp_path), TIMEOUT, started=time.time() - TIMEOUT - CHIEF_STARTUP_SECONDS - 1)


def test_a_healthy_heartbeat_interval_is_not_mistaken_for_a_lost_chief(tmp_path):
    # status.json is written at most every HEARTBEAT_SECONDS: with a step timeout no longer than
    # that, a healthy chief's file is older than the timeout between two heartbeats.
    started = time.time() - 60
    write_status(tmp_path, "training", age=TIMEOUT + HEARTBEAT_SECONDS - 1)
    check_chief(str(tmp_path), TIMEOUT, started)
    write_status(tmp_path, "training", age=TIMEOUT + HEARTBEAT_SECONDS + 1)
    with pytest.raises(RetryableError, match="lost the chief"):
        check_chief(str(tmp_path), TIMEOUT, started)


def test_a_chief_tracing_its_first_save_or_evaluation_is_not_lost_after_one_step_timeout(tmp_path):
    # Past its first step, the chief's first call of each other kind (a save, an epoch's end) traces and
    # compiles, untimed by its watchdog; it says so in status.json. The evaluator gave up on it after the
    # step time-out plus one heartbeat (seen under a doubled load: two tests at a time on 2 cores).
    started = time.time() - 2 * CHIEF_STARTUP_SECONDS  # the allowance counts from the chief's write, not this
    write_status(tmp_path, "compiling", age=TIMEOUT + HEARTBEAT_SECONDS + 10)
    check_chief(str(tmp_path), TIMEOUT, started)
    write_status(tmp_path, "compiling", age=TIMEOUT + CHIEF_STARTUP_SECONDS - 1)
    check_chief(str(tmp_path), TIMEOUT, started)
    write_status(tmp_path, "compiling", age=TIMEOUT + CHIEF_STARTUP_SECONDS + 1)
    with pytest.raises(RetryableError, match="lost the chief"):
        check_chief(str(tmp_path), TIMEOUT, started)


@pytest.mark.parametrize("state", ["failed", "preempted", "lost_peer"])
def test_a_chief_that_failed_since_the_evaluator_started_ends_the_evaluator(tmp_path, state):
    # lost_peer too: the group restarts, and an evaluator waiting on held the restart up for the --workers
    # launcher's whole preemption grace (60 s) before it was killed.
    write_status(tmp_path, state, age=1)
    with pytest.raises(RetryableError, match="training ended"):
        check_chief(str(tmp_path), 0, started=time.time() - 10)
    write_status(tmp_path, state, age=20)  # a failure of the run before this one: not ours to report
    check_chief(str(tmp_path), 0, started=time.time() - 10)


@pytest.mark.parametrize("state", ["done", "stopped_early"])
def test_a_chief_that_finished_training_is_never_lost(tmp_path, state):
    # An evaluator behind the chief goes on through its backlog after the chief's last heartbeat (its end),
    # however long that takes: the last epoch's checkpoint is there to evaluate.
    started = time.time() - 3 * CHIEF_STARTUP_SECONDS
    write_status(tmp_path, state, age=TIMEOUT + CHIEF_STARTUP_SECONDS + 60)
    check_chief(str(tmp_path), TIMEOUT, started)


def test_an_epoch_the_chief_dropped_after_it_was_listed_is_skipped_and_another_network_is_an_error(tmp_path):
    # The chief keeps at most EPOCHS_KEPT_FOR_EVALUATOR epochs waiting and deletes the oldest beyond, which an
    # evaluator that far behind may have listed already: it misses that epoch (exit 1 before).
    import tensorflow as tf

    from resnet18.runtime.checkpoint_files import remove_checkpoint
    from resnet18.training.evaluator import _restore

    prefix = tf.train.Checkpoint(model=tf.Variable([1.0, 2.0])).save(str(tmp_path / "ckpt"))  # as the chief saves
    restored = tf.Variable([0.0, 0.0])
    assert _restore(tf.train.Checkpoint(model=restored), prefix) is True
    assert restored.numpy().tolist() == [1.0, 2.0]
    remove_checkpoint(prefix)
    remove_checkpoint(prefix)  # the evaluator and the chief may both remove it
    assert _restore(tf.train.Checkpoint(model=restored), prefix) is False
    other = tf.train.Checkpoint(head=tf.Variable([3.0])).save(str(tmp_path / "other"))
    with pytest.raises(TrainingError, match="does not hold this task's network"):
        _restore(tf.train.Checkpoint(model=restored), other)
