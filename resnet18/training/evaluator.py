"""The sidecar evaluator: evaluates each epoch's checkpoint of the chief as it appears.

With `train.evaluation: sidecar` the training workers skip the per-epoch evaluation
(more time training, no evaluation collectives) and a separate task does it, as TF
Model Garden's continuous evaluation and Keras' SidecarEvaluator do. It is started
with TF_CONFIG task type `evaluator` (a Kubeflow TFJob `Evaluator` replica, Vertex
AI's fourth worker pool, or `python -m launcher --workers N --evaluator`), joins no
collective, and on one device:

- waits for each epoch's evaluated weights, which the chief keeps for it in
  WORKDIR/epoch_checkpoints/ (the weight average when there is one) until it has
  evaluated them and deleted them, so a busy evaluator misses none; evaluates the
  test split, every example once;
- appends the result to WORKDIR/evaluations.jsonl (history.py merges it into each
  epoch's entry, so reports and status read one history) and to TensorBoard's test
  scalars; an evaluator that restarts skips the epochs already evaluated, and one
  EPOCHS_KEPT_FOR_EVALUATOR epochs behind skips those the chief dropped;
- after the last epoch adds the test metrics to summary.json and exits 0 (the
  launcher then writes the report);
- exits 138 when the chief stops making progress (its status.json heartbeat is older
  than train.step_timeout_seconds plus the heartbeat interval) without finishing, or
  reports a preemption, a failure or a lost peer: a restart of the job fixes that. Until the chief's
  first heartbeat since the evaluator started, the chief is starting (data, tracing,
  compilation: what its own watchdog leaves untimed too), and it gets
  CHIEF_STARTUP_SECONDS instead of the heartbeat interval; so does a chief whose
  status.json says "compiling" (the first call of a kind: its first save or epoch end).

Rules that need each epoch's test metrics during training (plateau, early stopping,
best checkpoint) are refused with sidecar evaluation (config.validate): they would
make training wait for another task.

    python -m launcher --workers 2 --evaluator --job tests/jobs/tiny.yaml
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import tensorflow as tf

from resnet18.config import Config
from resnet18.data import pipeline, sources
from resnet18.runtime import hardware
from resnet18.runtime.checkpoint_files import EPOCHS_DIR, checkpoint_candidates, remove_checkpoint
from resnet18.runtime.errors import RetryableError, TrainingError, first_line
from resnet18.runtime.history import EVALUATIONS_FILE, read_evaluations
from resnet18.runtime.files import append_text, read_json, write_json
from resnet18.runtime.status import STARTUP_SECONDS, append_event, heartbeat_allowance, read_status
from resnet18.runtime.summaries import Summaries
from resnet18.runtime.watchdog import Watchdog
from resnet18 import tasks
from resnet18.tasks import task_of
from resnet18.tasks.task import Setting

POLL_SECONDS = 1.0
SUMMARY_WAIT_SECONDS = 120  # after the last epoch, how long to wait for the trainer's summary.json
CHIEF_STARTUP_SECONDS = STARTUP_SECONDS  # beyond train.step_timeout_seconds, for a chief not yet past its first step


def run_evaluator(config: Config, strategy: tf.distribute.Strategy, workdir: str) -> dict[str, Any]:
    """Evaluates every epoch's checkpoint until the last with the task's own evaluation; returns the last one.

    Raises:
      RetryableError: the chief was lost, preempted or failed before the last epoch (exit 138).
    """
    task = task_of(tasks.check(config))
    source = sources.prepare_source(config.data, workdir)
    steps_per_epoch = pipeline.steps_per_epoch(source.num_train, config.train.global_batch_size)
    total_steps = config.train.epochs * steps_per_epoch
    precision = hardware.strategy_precision(config.train.precision, strategy)
    with strategy.scope():
        model = task.build_network(config, source.num_classes, precision)
    # The evaluated weights (the average when training keeps one), saved by the chief for this task.
    checkpoint = tf.train.Checkpoint(model=model)
    evaluate = task.make_evaluation(Setting(config, strategy, source.num_classes, precision), model, source,
                                    lambda: None)
    done = {entry["step"] for entry in read_evaluations(workdir)}
    append_event(workdir, {"event": "evaluator_start", "evaluated": sorted(done)})
    started, last, first = time.time(), None, True
    with Summaries(workdir, is_chief=True) as summaries, contextlib.closing(
            Watchdog(config.train.step_timeout_seconds)) as watchdog:
        while True:
            for step, prefix in _new_epoch_checkpoints(workdir, steps_per_epoch, done):
                # The first evaluation traces and compiles (as the trainer's first call, it is not timed).
                with contextlib.nullcontext() if first else watchdog.watching(f"evaluating {prefix}"):
                    if not _restore(checkpoint, prefix):
                        print(f"Skipped {os.path.basename(prefix)}: the chief dropped it before it was evaluated "
                              "(too many epochs waited for this evaluator)", flush=True)
                        continue
                    last = dict(evaluate(), step=step, epoch=step // steps_per_epoch,
                                checkpoint=os.path.basename(prefix))
                first = False
                _record(workdir, summaries, last)
                done.add(step)
                remove_checkpoint(prefix)  # evaluated: the chief keeps no copy for us
                print(f"Evaluated {last['checkpoint']} (epoch {last['epoch']}): {_metrics_line(last)}", flush=True)
            if total_steps in done:
                _finish(workdir, last or _last_evaluation(workdir))
                return last or _last_evaluation(workdir)
            check_chief(workdir, config.train.step_timeout_seconds, started)
            time.sleep(POLL_SECONDS)


def _restore(checkpoint: tf.train.Checkpoint, prefix: str) -> bool:
    """Restores an epoch's weights, all of them: a checkpoint of another network is an error, never half-read.

    Returns False when the checkpoint is gone: the chief drops the oldest epoch of too many waiting (an
    evaluator that far behind misses it), possibly after this evaluator listed it.
    """
    try:
        checkpoint.restore(prefix).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        if not (tf.io.gfile.exists(prefix + ".index") and tf.io.gfile.glob(prefix + ".data-*")):
            return False
        raise TrainingError(f"{prefix} does not hold this task's network ({first_line(error)}); the evaluator's "
                            "config must be the trainers'") from None
    return True


def _metrics_line(evaluation: dict[str, Any]) -> str:
    shown = [f"{key} {evaluation[key]:.4f}" for key in ("test_loss", "test_accuracy") if key in evaluation]
    return "  ".join(shown)


def _new_epoch_checkpoints(workdir: str, steps_per_epoch: int, done: set[int]) -> list[tuple[int, str]]:
    """(step, prefix) of the epoch-end checkpoints not evaluated yet, oldest first."""
    found = []
    for prefix in checkpoint_candidates(os.path.join(workdir, EPOCHS_DIR)):
        step = int(prefix.rsplit("-", 1)[1])
        if step not in done:
            found.append((step, prefix))
    return sorted(found)


def _record(workdir: str, summaries: Summaries, evaluation: dict[str, Any]) -> None:
    entry = {key: value for key, value in evaluation.items() if key != "confusion_matrix"}
    append_text(os.path.join(workdir, EVALUATIONS_FILE),
                json.dumps(dict(entry, confusion_matrix=evaluation["confusion_matrix"])) + "\n")
    summaries.scalars("test", evaluation["step"], {name: evaluation[key] for name, key in (
        ("loss", "test_loss"), ("accuracy", "test_accuracy")) if key in evaluation})


def _last_evaluation(workdir: str) -> dict[str, Any]:
    return max(read_evaluations(workdir), key=lambda entry: entry["step"])


def check_chief(workdir: str, timeout: float, started: float) -> None:
    """Raises RetryableError when the chief ended without the last epoch, or stopped making progress.

    `started` is when this evaluator started; `timeout` is train.step_timeout_seconds (0: never).
    """
    status = read_status(workdir) or {}
    state, updated = status.get("state"), status.get("updated") or 0.0
    # Each of these ends the group's attempt, which the launcher (or the cluster) restarts, the evaluator with
    # it: waiting on would hold up the restart (the --workers launcher gives it the preemption grace).
    if state in ("preempted", "failed", "lost_peer") and updated >= started:
        raise RetryableError(f"the chief's training ended ({state}: {status.get('detail', '')}) before the last "
                             "epoch; restart the job to resume, and the evaluator with it")
    if not timeout:
        return
    # A healthy chief's heartbeat is no older than its own watchdog allows; before its first heartbeat
    # since we started, it is starting (tracing and compiling), counted from our start.
    if updated < started:
        updated, state = started, "starting"
    allowance = heartbeat_allowance(timeout, state)
    if allowance is not None and time.time() - updated > allowance:
        raise RetryableError(f"lost the chief: no progress in {workdir}/status.json for {allowance:g} s "
                             "(train.step_timeout_seconds, plus the heartbeat interval or the chief's start-up); "
                             "restart the job to resume")


def _finish(workdir: str, last: dict[str, Any]) -> None:
    """Adds the last epoch's test metrics to the trainer's summary.json."""
    path = os.path.join(workdir, "summary.json")
    deadline = time.time() + SUMMARY_WAIT_SECONDS
    summary = read_json(path)
    while summary is None and time.time() < deadline:  # the trainer writes it right after its last save
        time.sleep(POLL_SECONDS)
        summary = read_json(path)
    if summary is None:
        raise TrainingError(f"training reached its last checkpoint but wrote no {path} within "
                            f"{SUMMARY_WAIT_SECONDS} s")
    summary.update(test_accuracy=last["test_accuracy"], test_loss=last.get("test_loss"),
                   test_examples=last["test_examples"], confusion_matrix=last["confusion_matrix"],
                   evaluation="sidecar")
    write_json(path, summary)
    append_event(workdir, {"event": "evaluator_end", "step": last["step"], "state": "done"})
    print(f"Done: {_metrics_line(last)}  (epoch {last['epoch']}, sidecar evaluator) -> {workdir}", flush=True)

