"""The Checkpointer: saves and restores a TrainState on every worker, keeps the chief's copy.

Restores go through runtime/checkpoint_files.py (newest readable checkpoint first).

    python -m pytest tests/test_checkpointing.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import tensorflow as tf

from resnet18.runtime.checkpoint_files import (EPOCHS_DIR, EPOCHS_KEPT_FOR_EVALUATOR, checkpoint_candidates,
                                               holds_object, leading_dimension, remove_checkpoint,
                                               remove_stale_temporaries, restore_latest_good)
from resnet18.runtime.errors import SetupError, TrainingError
from resnet18.runtime.files import remove_abandoned_temporaries
from resnet18.training.replicas import BatchNormStatistics


class Checkpointer:
    """Saves and restores a TrainState in WORKDIR/checkpoints (and the best epoch in WORKDIR/best).

    Every worker restores the chief's newest good checkpoint (WORKDIR must be storage
    all workers see) and takes part in every save (saving may use collectives), but
    only the chief keeps what it saves: the others write into a temporary directory
    deleted by `close()`. Weights are checked to be finite before every save.
    """

    def __init__(self, state, workdir: str, is_chief: bool, max_to_keep: int,
                 statistics: BatchNormStatistics | None, weights_are_finite: Callable[[], bool]):
        self.state = state
        self.is_chief = is_chief
        self.chief_dir = os.path.join(workdir, "checkpoints")
        self.directory = self.chief_dir if is_chief else tempfile.mkdtemp(prefix="ckpt_worker_")
        self.last_saved: str | None = None
        self.skipped: list[str] = []  # by restore(): newer checkpoints it could not read, and why
        self.removed: list[str] = []  # by restore(): leftovers of interrupted saves it deleted
        self._statistics = statistics
        self._weights_are_finite = weights_are_finite
        self._manager = tf.train.CheckpointManager(self._checkpoint(), self.directory, max_to_keep=max_to_keep)
        best_dir = os.path.join(workdir, "best") if is_chief else os.path.join(self.directory, "best")
        self._best = tf.train.CheckpointManager(tf.train.Checkpoint(model=state.evaluated_model), best_dir,
                                                max_to_keep=1)
        # For a sidecar evaluator: every epoch's evaluated weights, kept until it has evaluated them
        # (it deletes each), so none is lost to checkpoint_max_to_keep while it is busy.
        epochs_dir = os.path.join(workdir, EPOCHS_DIR) if is_chief else os.path.join(self.directory, EPOCHS_DIR)
        self._epochs = tf.train.CheckpointManager(tf.train.Checkpoint(model=state.evaluated_model), epochs_dir,
                                                  max_to_keep=None)

    def restore(self) -> int:
        """Restores the newest good checkpoint, if any; returns the step to start from.

        Raises:
          SetupError: checkpoints exist but none can be restored into this state.
        """
        if self.is_chief:
            workdir = os.path.dirname(self.chief_dir)  # and its small files' copies of writers killed mid-write
            self.removed = remove_stale_temporaries(self.chief_dir) + remove_abandoned_temporaries(workdir)
            for path in self.removed:
                print(f"Removed {path}, left by an interrupted save", flush=True)
        average = self.state.average
        # A weight average turned on for a run whose checkpoints have none starts from the restored weights;
        # a loss scale (float16) new to them starts at its initial value.
        average_is_new = average is not None and not holds_object(self.chief_dir, "ema_model")
        loss_scale_is_new = self.state.loss_scaled and not holds_object(self.chief_dir, "loss_scale")
        # Each replica's own statistics, saved where a save was not scheduled: only for as many replicas.
        rows = self._statistics.replicas if self._statistics and self._statistics.trackable else None
        own_statistics = rows is not None and leading_dimension(self.chief_dir, "replica_statistics") == rows
        try:
            self.last_saved = restore_latest_good(self._checkpoint(
                with_average=not average_is_new, with_loss_scale=not loss_scale_is_new,
                with_replica_statistics=own_statistics), self.chief_dir, self.skipped)
        except RuntimeError as error:
            raise SetupError(str(error)) from None
        if own_statistics and self.last_saved:
            self._statistics.release()
        if average_is_new and self.last_saved:
            average.copy_weights()
            if self.is_chief:
                print("train.ema_decay is new for this run: the weight average starts from the restored weights",
                      flush=True)
        return int(self.state.step.numpy())

    def _checkpoint(self, with_average: bool = True, with_loss_scale: bool = True,
                    with_replica_statistics: bool = True) -> tf.train.Checkpoint:
        checkpoint = self.state.checkpoint(with_average=with_average, with_loss_scale=with_loss_scale)
        if with_replica_statistics and self._statistics and self._statistics.trackable:
            checkpoint.replica_statistics = self._statistics.trackable
        return checkpoint

    def save(self, step: int, statistics_synced: bool = False, scheduled: bool = True) -> None:
        """Checkpoints at `step` on every worker; never writes non-finite weights.

        A scheduled save (every train.checkpoint_every_steps, each epoch's end: steps the run saves at
        whether it is interrupted or not) pools the batch-norm statistics into every replica first, as
        evaluation does. An unscheduled one (a preemption) keeps each replica's own statistics for the
        resumed run and pools only what the checkpoint's model holds (the process exits after it).
        """
        if self._statistics is not None:
            if scheduled and not statistics_synced:
                self._statistics.pool()
            self._statistics.capture()
            if not scheduled:
                self._statistics.pool()
        if not self._weights_are_finite():
            raise TrainingError(f"weights became NaN/Inf by step {step}; stopping without saving "
                                f"(the last good checkpoint, {self.last_saved}, is kept)")
        self.state.step.assign(step)
        try:
            self.last_saved = self._manager.save(checkpoint_number=step)
        except Exception:
            if self.is_chief:  # a failed save's half-written files (a full disk: the space they hold) go now,
                remove_stale_temporaries(self.chief_dir)  # not at the next start
            raise
        if self.is_chief:
            print(f"Checkpoint at step {step}: {self.last_saved}", flush=True)

    def save_for_evaluator(self, step: int) -> str:
        """Keeps the evaluated weights of the epoch ending at `step` for the sidecar evaluator.

        At most EPOCHS_KEPT_FOR_EVALUATOR wait for it: beyond that the oldest is deleted, and the chief says so.
        """
        path = self._epochs.save(checkpoint_number=step)
        waiting = checkpoint_candidates(self._epochs.directory)
        for prefix in waiting[EPOCHS_KEPT_FOR_EVALUATOR:]:
            remove_checkpoint(prefix)
            if self.is_chief:
                print(f"warning: {len(waiting)} epochs wait for a sidecar evaluator (none is running, or it is "
                      f"{EPOCHS_KEPT_FOR_EVALUATOR} epochs behind); dropped {os.path.basename(prefix)}, which it will "
                      "not evaluate", flush=True)
        return path

    def save_best(self, step: int) -> str:
        """Keeps the evaluated weights as the best epoch's (every worker takes part)."""
        return self._best.save(checkpoint_number=step)

    def close(self) -> None:
        if not self.is_chief:
            shutil.rmtree(self.directory, ignore_errors=True)
