"""train_and_evaluate: the custom tf.distribute training loop.

Reads top to bottom in sections: setup, data, model and optimizer, restore, step
functions, loop, summary. The loop runs several steps per tf.function call
(the loss averaged over the global batch), evaluates each epoch, writes
TensorBoard scalars and checkpoints, and applies the epoch-end rules. Keras 3
`Model.fit` is not used: it fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585); a custom loop works with every strategy.

    python -m launcher --job jobs/cpu_smoke.yaml      # runs this through the command line
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable

import keras
import tensorflow as tf

from resnet18 import config as config_lib
from resnet18 import tasks
from resnet18.config import Config
from resnet18.data import pipeline, sources
from resnet18.runtime import hardware
from resnet18.runtime.errors import (EXIT_FAILURE, EXIT_RETRYABLE, PEER_LOSS_WORDS, PreemptedBeforeTraining,
                                     RetryableError, TrainingError, first_line, lost_a_peer)
from resnet18.runtime.history import read_history, write_history
from resnet18.runtime.preemption import PreemptionWatcher
from resnet18.runtime.status import Heartbeat, append_event
from resnet18.runtime.summaries import Summaries
from resnet18.runtime.topology import Topology, topology_of
from resnet18.runtime.watchdog import Watchdog
from resnet18.tasks.task import Setting, Task
from resnet18.training import epoch_rules, replicas, weights
from resnet18.training.checkpointing import Checkpointer
from resnet18.training.run_config import check_resume_config, save_config
from resnet18.training.state import TrainState, build_train_state
from resnet18.training.step import make_train_calls, make_train_step
from resnet18.training.summary import process_start_time, summarize, write_summary


def train_and_evaluate(config: Config, strategy: tf.distribute.Strategy, workdir: str,
                       stop_after_epoch: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Trains and evaluates under `strategy`; resumes from WORKDIR/checkpoints.

    `stop_after_epoch`, if given, is asked on the chief after every evaluated epoch (its history
    entry): True stops the run there, on every worker, like early stopping (a sweep's pruner).
    Returns the run summary (also written to WORKDIR/summary.json by the chief).

    Raises:
      ConfigError, SetupError: bad settings for this hardware, data set missing (exit 2).
      TrainingError: the loss or the weights became NaN or infinite (exit 1).
      RetryableError: preempted; a checkpoint was saved (exit 138).
    """
    with contextlib.ExitStack() as cleanup:  # closed on every way out: done, preempted, NaN, a lost peer
        # --- Setup ------------------------------------------------------------------------
        wall_start = time.time()
        watcher = cleanup.enter_context(PreemptionWatcher())  # SIGTERM before the first step: exit 138
        topology = topology_of(strategy)
        task = tasks.task_of(config)
        config = settle_config(config, strategy, workdir)
        precision, global_batch = config.train.precision, config.train.global_batch_size

        # --- Data -------------------------------------------------------------------------
        # TPU input pipelines run on the TPU hosts, where Python cannot: they hold the data as graph constants.
        source = sources.prepare_source(config.data, workdir,
                                        random_access=not isinstance(strategy, tf.distribute.TPUStrategy))
        steps_per_epoch = pipeline.steps_per_epoch(source.num_train, global_batch)
        setting = Setting(config, strategy, source.num_classes, precision, workdir, topology.is_chief)

        # --- Network and optimizer (every variable inside the strategy scope) ----------------
        state = build_train_state(config, strategy, task, source.num_classes, precision, steps_per_epoch)
        statistics = replicas.BatchNormStatistics(strategy, [state.model] + ([state.average.model]
                                                                            if state.average else []))

        # --- Weights: the run's own checkpoint, else train.init_from, else the seed's --------
        checkpointer = Checkpointer(state, workdir, topology.is_chief, config.train.checkpoint_max_to_keep,
                                    statistics, replicas.make_finite_check(state.model))
        cleanup.callback(checkpointer.close)
        start_step = weights.initialize(state, checkpointer, config, source.num_classes, _say(topology))
        if topology.num_processes > 1:
            replicas.check_same_step(strategy, start_step, workdir)
        objective = task.make_objective(setting, state.model, bool(checkpointer.last_saved))  # e.g. loads a teacher
        if topology.is_chief:  # the checkpoints are this config's now
            save_config(config, workdir, checkpointer.last_saved, task.sections)
        if topology.is_chief and checkpointer.last_saved:
            print(f"Resuming from {checkpointer.last_saved} at step {start_step}/"
                  f"{config.train.epochs * steps_per_epoch}", flush=True)

        # --- Step functions -----------------------------------------------------------------
        train_dataset = strategy.distribute_datasets_from_function(pipeline.train_dataset_fn(
            source, config.data, task.train_augmentation(config), global_batch, config.train.epochs,
            config.runtime.seed, start_step, os.path.join(workdir, "order_log") if config.data.order_log else None))
        loop = Loop(
            config=config, task=task, topology=topology, state=state, checkpointer=checkpointer, workdir=workdir,
            steps_per_epoch=steps_per_epoch, train_calls=make_train_calls(strategy, make_train_step(
                state.model, state.optimizer, objective, config, source.num_classes, state.average), global_batch),
            evaluate=task.make_evaluation(setting, state.evaluated_model, source, statistics.pool),
            any_replica=replicas.make_any_replica(strategy) if topology.num_processes > 1 else lambda flag: flag,
            wall_start=wall_start, watchdog=cleanup.enter_context(contextlib.closing(
                Watchdog(config.train.step_timeout_seconds))),
            heartbeat=Heartbeat(workdir, topology.is_chief, config.train.epochs * steps_per_epoch, steps_per_epoch,
                                start_step),
            stop_after_epoch=stop_after_epoch)

        # --- Loop ---------------------------------------------------------------------------
        summaries = cleanup.enter_context(Summaries(workdir, topology.is_chief))
        with _recorded(loop, start_step) as outcome:
            progress = run_loop(loop, iter(train_dataset), start_step, watcher, summaries)
            outcome.update(step=progress.step, state="stopped_early" if progress.stopped_at_epoch else "done")

        # --- Summary ------------------------------------------------------------------------
        summary = summarize(loop, progress, source, strategy, precision)
        if topology.is_chief:
            write_summary(workdir, summary)
        if watcher.requested:  # in or after the last epoch's last call, all saved: nothing is left to resume
            print(f"SIGTERM during or after the last training step ({progress.step}): training is complete; "
                  "exiting 0", flush=True)
        return summary


def settle_config(config: Config, strategy: tf.distribute.Strategy, workdir: str) -> Config:
    """Settles what depends on the hardware (the precision `auto` resolves to, XLA on TPUs) and checks the config
    against its task and the work directory's checkpoints; returns the config the run trains with.

    What a run refuses before it trains: a dry run calls this too, so it never promises what the run refuses.
    """
    task, topology = tasks.task_of(config), topology_of(strategy)
    tasks.check(config)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
        # Grappler's arithmetic optimizer regroups float additions where it can prove their shapes equal, and
        # MirroredStrategy's cross-replica sums are additions in the step's own graph (MultiWorkerMirrored's are
        # collectives): regrouped, the same sums round differently in the two layouts.
        tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    config_lib.check_batch_divisible(config, topology.num_replicas)
    if config.train.xla and isinstance(strategy, tf.distribute.TPUStrategy):
        # A TPU compiles every step with XLA anyway; a nested jit_compile function would only get in the way.
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, xla=False))
        _say(topology)("train.xla: ignored on TPUs (every step is compiled already)")
    precision = hardware.strategy_precision(config.train.precision, strategy)
    if precision != config.train.precision:
        _say(topology)(f"Precision: {precision} (train.precision {config.train.precision})")
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
    check_resume_config(config, workdir, task.sections)
    return config


def _say(topology: Topology) -> Callable[[str], None]:
    """print, on the chief only."""
    return (lambda text: print(text, flush=True)) if topology.is_chief else (lambda text: None)


@contextlib.contextmanager
def _recorded(loop: Loop, start_step: int):
    """Records the start and the end of training (and how it ended) in events.jsonl and status.json."""
    chief = loop.topology.is_chief
    if chief:
        append_event(loop.workdir, {"event": "train_start", "step": start_step, "task": loop.topology.task,
                                    "pid": os.getpid(), "skipped_checkpoints": loop.checkpointer.skipped,
                                    "removed_temporaries": loop.checkpointer.removed,
                                    "processes": loop.topology.num_processes, "replicas": loop.topology.num_replicas})
    outcome = {"step": start_step, "state": "failed", "exit_code": 0, "detail": ""}
    try:
        yield outcome
    except BaseException as error:
        # A lost peer is still a TensorFlow error here; the launcher maps it to 138 on the way out: say so now.
        peer = lost_a_peer(error)
        preempted = isinstance(error, (RetryableError, PreemptedBeforeTraining))
        outcome.update(state="preempted" if preempted else "lost_peer" if peer else "failed",
                       exit_code=getattr(error, "exit_code", EXIT_RETRYABLE if peer else EXIT_FAILURE),
                       detail=first_line(error, PEER_LOSS_WORDS), step=loop.heartbeat_step())
        raise
    finally:
        if chief:
            loop.heartbeat.end(outcome["step"], outcome["state"], outcome["detail"])
            append_event(loop.workdir, {"event": "train_end", **outcome})


@dataclasses.dataclass
class Loop:
    """What the loop works with (fixed for the run)."""

    config: Config
    task: Task
    topology: Topology
    state: TrainState
    checkpointer: Checkpointer
    workdir: str
    steps_per_epoch: int
    train_calls: Callable  # (iterator, steps) -> (loss sum, correct sum)
    evaluate: Callable[[], dict[str, Any]]
    any_replica: Callable[[bool], bool]  # agreed across workers
    wall_start: float
    watchdog: Watchdog  # exits 138 when a call makes no progress (train.step_timeout_seconds)
    heartbeat: Heartbeat  # WORKDIR/status.json, written by the chief
    stop_after_epoch: Callable[[dict[str, Any]], bool] | None = None  # asked on the chief after each evaluation

    def heartbeat_step(self) -> int:
        """The step last recorded by the heartbeat (where a failed run stood)."""
        return int(self.heartbeat.last_step)

    traced: set[str] = dataclasses.field(default_factory=set)  # kinds of call done once (traced, compiled)

    @contextlib.contextmanager
    def watching(self, kind: str, what: str):
        """The watchdog armed for `what`, unless it is the first call of its `kind` (which traces and
        compiles: minutes on a loaded machine, which step_timeout_seconds does not bound)."""
        if kind in self.traced:
            with self.watchdog.watching(what):
                yield
        else:
            with self.heartbeat.compiling():
                yield
            self.traced.add(kind)

    @property
    def total_steps(self) -> int:
        return self.config.train.epochs * self.steps_per_epoch

    @property
    def global_batch(self) -> int:
        return self.config.train.global_batch_size

    def say(self, text: str) -> None:
        if self.topology.is_chief:
            print(text, flush=True)


@dataclasses.dataclass
class Progress:
    """What the loop has done so far (this run, plus the epochs recorded before it)."""

    start_step: int
    step: int
    earlier_history: list[dict[str, Any]]  # epochs finished before this run started
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # epochs of this run
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # last evaluation
    stopped_at_epoch: int | None = None  # early stopping
    train_seconds: float = 0.0  # training calls after the first (images/s)
    train_images: int = 0
    all_train_seconds: float = 0.0  # every training call, compilation included, across restarts
    startup_seconds: float | None = None  # process start -> end of the first training call
    first_epoch_seconds: float | None = None  # process start -> end of this run's first epoch (evaluated, saved)
    first_call: bool = True

    @property
    def epochs_so_far(self) -> list[dict[str, Any]]:
        return self.earlier_history + self.history


def run_loop(loop: Loop, iterator, start_step: int, watcher: PreemptionWatcher, summaries: Summaries) -> Progress:
    """Trains from `start_step` to the last step (or early stop); evaluates every epoch."""
    # Every worker reads the history (shared WORKDIR): the epoch rules must decide alike everywhere.
    earlier = [entry for entry in read_history(loop.workdir) if entry["step"] <= start_step]
    if len(earlier) != start_step // loop.steps_per_epoch:
        loop.say(f"warning: {loop.workdir}/history.jsonl holds {len(earlier)} of the "
                 f"{start_step // loop.steps_per_epoch} finished epochs; plateau, early stopping and the best "
                 "epoch replay only those")
    epoch_rules.check_replayable(earlier, loop.config.train, f"{loop.workdir}/history.jsonl")
    progress = Progress(start_step=start_step, step=start_step, earlier_history=earlier,
                        all_train_seconds=earlier[-1].get("train_seconds", 0.0) if earlier else 0.0)
    progress.stopped_at_epoch = apply_epoch_rules(loop, earlier)
    watcher.arm()  # from here a SIGTERM means: checkpoint at an agreed step, then exit 138
    while progress.step < loop.total_steps and progress.stopped_at_epoch is None:
        epoch = progress.step // loop.steps_per_epoch
        totals = train_epoch(loop, progress, iterator, epoch, watcher, summaries)
        end_epoch(loop, progress, epoch, totals, summaries)  # a preemption at the epoch's end evaluates it first
        if progress.first_epoch_seconds is None:
            progress.first_epoch_seconds = time.time() - process_start_time()
        # Preempted at an epoch's end with nothing left to train (the last epoch, or stopped there): the run is
        # complete, and 138 would only have the cluster restart it. It exits 0 (train_and_evaluate says why).
        if totals.preempted and progress.step < loop.total_steps and progress.stopped_at_epoch is None:
            raise RetryableError(f"preempted (SIGTERM): checkpoint saved at step {progress.step}, the end of epoch "
                                 f"{epoch + 1}, evaluated first; run again to resume")
    if not progress.metrics and loop.config.train.evaluation == "inline":  # nothing was left to train
        progress.metrics = loop.evaluate()
        reason = (f"early stopping after epoch {progress.stopped_at_epoch}" if progress.stopped_at_epoch
                  else f"step {progress.step}")
        loop.say(f"Training already complete ({reason}); evaluated the final checkpoint")
    return progress


@dataclasses.dataclass
class EpochTotals:
    loss: float = 0.0
    correct: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    preempted: bool = False  # SIGTERM agreed on the epoch's last call: evaluate, save, then exit 138


def train_epoch(loop: Loop, progress: Progress, iterator, epoch: int, watcher: PreemptionWatcher,
                summaries: Summaries) -> EpochTotals:
    """Trains the rest of `epoch`, checkpointing on the way; exits 138 (agreed) on SIGTERM."""
    epoch_end = (epoch + 1) * loop.steps_per_epoch
    every = loop.config.train.checkpoint_every_steps
    bar = keras.utils.Progbar(epoch_end - progress.step, stateful_metrics=["loss", "accuracy", "img/s"],
                              verbose=1 if loop.topology.is_chief and sys.stdout.isatty() else 0)
    loop.say(f"Epoch {epoch + 1}/{loop.config.train.epochs}")
    totals = EpochTotals()
    while progress.step < epoch_end and not totals.preempted:
        next_checkpoint = (progress.step // every + 1) * every if every else epoch_end
        # The first call runs one step: it traces and compiles, and a user sees progress soon.
        chunk = min(1 if progress.first_call else loop.config.train.steps_per_loop, epoch_end - progress.step,
                    next_checkpoint - progress.step)
        with loop.watching("train", f"training steps {progress.step + 1}-{progress.step + chunk}"):
            train_call(loop, progress, iterator, chunk, totals, bar, summaries)
            preempted = loop.any_replica(watcher.requested)
        saved = bool(every) and progress.step % every == 0 and progress.step < epoch_end
        if saved:
            with loop.watching("save", f"the checkpoint at step {progress.step}"):
                loop.checkpointer.save(progress.step)
        if preempted:
            if progress.step < epoch_end:  # at the epoch's end, end_epoch evaluates and saves it first
                if not saved:  # a step the uninterrupted run does not save at
                    with loop.watching("save", f"the checkpoint at step {progress.step}"):
                        loop.checkpointer.save(progress.step, scheduled=False)
                raise RetryableError(f"preempted (SIGTERM): checkpoint saved at step {progress.step}; "
                                     "run again to resume")
            totals.preempted = True
    return totals


def train_call(loop: Loop, progress: Progress, iterator, chunk: int, totals: EpochTotals, bar,
               summaries: Summaries) -> None:
    """One call of the compiled loop: `chunk` steps; checks the loss and records the progress."""
    started = time.perf_counter()
    loss_sum, correct_sum = loop.train_calls(iterator, tf.constant(chunk))
    loss_sum, correct_sum = float(loss_sum), float(correct_sum)  # waits for the steps to finish
    elapsed = time.perf_counter() - started
    if not math.isfinite(loss_sum):
        raise TrainingError(f"loss is {loss_sum} in steps {progress.step + 1}-{progress.step + chunk}; stopping "
                            f"(the last good checkpoint, {loop.checkpointer.last_saved}, is kept)")
    _count_call(progress, chunk * loop.global_batch, elapsed)
    progress.step += chunk
    totals.loss, totals.correct = totals.loss + loss_sum, totals.correct + correct_sum
    totals.steps, totals.seconds = totals.steps + chunk, totals.seconds + elapsed
    images_per_sec = chunk * loop.global_batch / elapsed
    bar.add(chunk, [("loss", totals.loss / totals.steps),
                    ("accuracy", totals.correct / (totals.steps * loop.global_batch)), ("img/s", images_per_sec)])
    summaries.scalars("train", progress.step, {
        "loss": loss_sum / chunk, "accuracy": correct_sum / (chunk * loop.global_batch),
        "learning_rate": float(loop.state.optimizer.learning_rate), "images_per_sec": images_per_sec})
    loop.heartbeat.beat(progress.step, chunk * loop.global_batch, elapsed)


def _count_call(progress: Progress, images: int, elapsed: float) -> None:
    if progress.first_call:  # it traces and compiles; leave it out of images/s
        progress.startup_seconds = time.time() - process_start_time()
    else:
        progress.train_seconds += elapsed
        progress.train_images += images
    progress.first_call = False
    progress.all_train_seconds += elapsed


def end_epoch(loop: Loop, progress: Progress, epoch: int, totals: EpochTotals, summaries: Summaries) -> None:
    """Evaluates, records the epoch, keeps the best weights, checkpoints and applies the epoch rules.

    With sidecar evaluation the evaluator task evaluates the epoch's checkpoint (evaluator.py).
    """
    with loop.watching("end_epoch", f"the end of epoch {epoch + 1}"):
        if loop.config.train.evaluation == "sidecar":
            _end_epoch_without_evaluation(loop, progress, epoch, totals)
        else:
            _end_epoch_with_evaluation(loop, progress, epoch, totals, summaries)


def _end_epoch_without_evaluation(loop: Loop, progress: Progress, epoch: int, totals: EpochTotals) -> None:
    progress.history.append(_epoch_entry(loop, progress, epoch, totals))
    if loop.topology.is_chief:
        write_history(loop.workdir, progress.epochs_so_far)
    loop.checkpointer.save(progress.step)  # pools the BN statistics first
    loop.checkpointer.save_for_evaluator(progress.step)
    loop.say(f"epoch {epoch + 1}/{loop.config.train.epochs}  step {progress.step}/{loop.total_steps}  "
             f"loss {totals.loss / totals.steps:.4f}  "
             f"accuracy {totals.correct / (totals.steps * loop.global_batch):.4f}"
             f"  {totals.steps * loop.global_batch / totals.seconds:.0f} img/s  (evaluated by the sidecar evaluator)")


def _epoch_entry(loop: Loop, progress: Progress, epoch: int, totals: EpochTotals) -> dict[str, Any]:
    return dict(epoch=epoch + 1, step=progress.step, train_loss=totals.loss / totals.steps,
                train_accuracy=totals.correct / (totals.steps * loop.global_batch),
                learning_rate=float(loop.state.optimizer.learning_rate),
                train_seconds=progress.all_train_seconds, elapsed_seconds=time.time() - loop.wall_start)


def _end_epoch_with_evaluation(loop: Loop, progress: Progress, epoch: int, totals: EpochTotals,
                               summaries: Summaries) -> None:
    metrics = loop.evaluate()
    confusion = metrics.pop("confusion_matrix")
    metrics.update(_epoch_entry(loop, progress, epoch, totals))
    progress.history.append(metrics)
    progress.metrics = dict(metrics, confusion_matrix=confusion)
    if loop.topology.is_chief:  # every epoch since step 0, across restarts (the report plots it)
        write_history(loop.workdir, progress.epochs_so_far)
    summaries.scalars("test", progress.step, {name: metrics[key] for name, key in (
        ("loss", "test_loss"), ("accuracy", "test_accuracy")) if key in metrics})
    # Asked before the save: a run killed after its checkpoint has told a sweep this epoch (the resumed run
    # starts after it); every worker stops alike, on the chief's answer, agreed.
    asked_to_stop = loop.stop_after_epoch is not None and loop.any_replica(
        loop.topology.is_chief and loop.stop_after_epoch(metrics))
    # Best first: a crash between the two saves then replays this epoch on resume (the newest
    # checkpoint is the previous one), so WORKDIR/best never misses a recorded best epoch.
    save_if_best(loop, progress.epochs_so_far)
    loop.checkpointer.save(progress.step, statistics_synced=True)  # evaluate() has just pooled them
    progress.stopped_at_epoch = apply_epoch_rules(loop, progress.epochs_so_far)
    if progress.stopped_at_epoch:
        loop.say(f"EarlyStopping: test_loss has not improved for {loop.config.train.early_stopping_patience} "
                 f"epochs; stopping after epoch {progress.stopped_at_epoch}")
    elif asked_to_stop:
        progress.stopped_at_epoch = epoch + 1
        loop.say(f"Stopping after epoch {epoch + 1}, as asked (a sweep's pruner)")
    loop.say(f"epoch {epoch + 1}/{loop.config.train.epochs}  step {progress.step}/{loop.total_steps}  "
             f"loss {metrics['train_loss']:.4f}  accuracy {metrics['train_accuracy']:.4f}  "
             + (f"test_loss {metrics['test_loss']:.4f}  " if "test_loss" in metrics else "")
             + f"test_accuracy {metrics['test_accuracy']:.4f}  "
             + ("" if "test_loss" in metrics else f"({loop.task.accuracy})  ")
             + f"{totals.steps * loop.global_batch / totals.seconds:.0f} img/s")


# Keras' callbacks (ReduceLROnPlateau, EarlyStopping, best checkpoint) decide from every epoch's
# test metrics so far, so a resumed run replays the recorded epochs (epoch_rules.py).

def apply_epoch_rules(loop: Loop, epochs_so_far: list[dict[str, Any]]) -> int | None:
    """Sets the plateau learning-rate scale; returns the early-stopping epoch, if reached."""
    train = loop.config.train
    if train.lr_schedule != "plateau" and not train.early_stopping_patience:
        return None  # (refused where there is no test loss: by config with sidecar evaluation, by tasks without one)
    losses = [entry["test_loss"] for entry in epochs_so_far]
    if train.lr_schedule == "plateau":
        scale = epoch_rules.plateau_scale(losses, train.plateau_factor, train.plateau_patience, train.plateau_min_delta)
        if scale != float(loop.state.schedule.scale.numpy()) and epochs_so_far:
            loop.say(f"ReduceLROnPlateau: learning rate x{scale:g} of its schedule (test_loss has not "
                     f"improved by {train.plateau_min_delta:g} for {train.plateau_patience} epochs)")
        loop.state.schedule.scale.assign(scale)
    if train.early_stopping_patience:
        return epoch_rules.early_stop_epoch(losses, train.early_stopping_patience, train.early_stopping_min_delta)
    return None


def save_if_best(loop: Loop, epochs_so_far: list[dict[str, Any]]) -> None:
    metric = loop.config.train.best_checkpoint_metric
    if metric and epoch_rules.best_epoch(epochs_so_far, metric) == len(epochs_so_far) - 1:
        path = loop.checkpointer.save_best(epochs_so_far[-1]["step"])
        loop.say(f"Best {metric} so far ({epochs_so_far[-1][metric]:.4f}): {path}")
