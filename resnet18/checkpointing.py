"""Checkpoints: a restore that survives a corrupt or partial latest checkpoint, and the Checkpointer.

tf.train.CheckpointManager writes a checkpoint to a temporary name and records it
in the `checkpoint` state file only once it is complete, so a crash mid-save
leaves the previous checkpoint as the latest. What it does not do is fall back
when the latest files are damaged afterwards (truncated copy, full disk, a bad
sync) or the state file is garbage: restoring then fails with DataLossError and
a naive job starts again from step 0. Here every checkpoint found is tried,
newest first, and the first that restores completely wins.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Callable

import tensorflow as tf
from absl import logging

from resnet18.errors import SetupError, TrainingError, first_line

_CHECKPOINT_INDEX = re.compile(r"^(ckpt-(\d+))\.index$")
EPOCHS_DIR = "epoch_checkpoints"  # sidecar evaluation: each epoch's evaluated weights, until evaluated


def checkpoint_candidates(directory: str) -> list[str]:
    """Checkpoint prefixes in `directory`, newest (highest step) first.

    Read from the files themselves rather than from the `checkpoint` state file,
    which may be the part that is damaged.
    """
    if not tf.io.gfile.isdir(directory):
        return []
    found = []
    for name in tf.io.gfile.listdir(directory):
        match = _CHECKPOINT_INDEX.match(name)
        if match:
            found.append((int(match.group(2)), os.path.join(directory, match.group(1))))
    return [prefix for _, prefix in sorted(found, reverse=True)]


def restore_latest_good(checkpoint: tf.train.Checkpoint, directory: str) -> str | None:
    """Restores the newest checkpoint of `directory` that reads completely.

    Returns its prefix, or None when the directory holds no checkpoint.

    Raises:
      RuntimeError: checkpoints exist but none can be read (never start over silently).
    """
    candidates = checkpoint_candidates(directory)
    failures = []
    mismatched = 0
    for prefix in candidates:
        try:
            checkpoint.restore(prefix).assert_existing_objects_matched()
        except Exception as error:  # DataLossError, IndexError, ValueError...: any damage
            reason = first_line(error)
            intact = _files_read(prefix)
            mismatched += intact
            what = "does not fit this model and optimizer" if intact else "is unreadable"
            logging.warning("checkpoint %s %s (%s); trying the previous one", prefix, what, reason)
            print(f"warning: checkpoint {prefix} {what} ({reason}); trying the previous one", flush=True)
            failures.append(f"{os.path.basename(prefix)}: {reason}")
            continue
        return prefix
    if candidates and mismatched == len(candidates):
        raise RuntimeError(
            f"the checkpoints in {directory} are intact but do not fit this job's model and optimizer: "
            "they were written with other settings (model.width, model.se, train.optimizer, ...) or by a "
            "launcher version with another checkpoint layout. Nothing was deleted: finish or export them "
            "with the settings and version that wrote them (WORKDIR/config.yaml), or use another --workdir"
        )
    if candidates:
        raise RuntimeError(
            f"no checkpoint in {directory} can be read ({'; '.join(failures)}); "
            "move the directory away to start from scratch"
        )
    return None


def holds_object(directory: str, name: str) -> bool:
    """Whether the newest checkpoint in `directory` saved an object `name` (e.g. ema_model).

    True when it cannot tell (no checkpoint, or an unreadable one): the normal restore
    then decides.
    """
    candidates = checkpoint_candidates(directory)
    if not candidates:
        return True
    try:
        return any(key.startswith(f"{name}/") for key, _ in tf.train.list_variables(candidates[0]))
    except Exception:  # damaged: restore_latest_good will fall back and explain
        return True


def _files_read(prefix: str) -> bool:
    """True if the checkpoint's files read completely (so a failed restore means a layout mismatch)."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
        return True
    except Exception:
        return False


def remove_stale_temporaries(directory: str) -> list[str]:
    """Deletes `*_temp*` leftovers of interrupted saves (never restored, safe to remove)."""
    removed = []
    if tf.io.gfile.isdir(directory):
        for name in tf.io.gfile.listdir(directory):
            if "_temp" in name:
                path = os.path.join(directory, name.rstrip("/"))
                if tf.io.gfile.isdir(path):
                    tf.io.gfile.rmtree(path)
                else:
                    tf.io.gfile.remove(path)
                removed.append(path)
    return removed


class Checkpointer:
    """Saves and restores a TrainState in WORKDIR/checkpoints (and the best epoch in WORKDIR/best).

    Every worker restores the chief's newest good checkpoint (WORKDIR must be storage
    all workers see) and takes part in every save (saving may use collectives), but
    only the chief keeps what it saves: the others write into a temporary directory
    deleted by `close()`. Weights are checked to be finite before every save.
    """

    def __init__(self, state, workdir: str, is_chief: bool, max_to_keep: int,
                 sync_statistics: Callable[[], None], weights_are_finite: Callable[[], bool]):
        self.state = state
        self.is_chief = is_chief
        self.chief_dir = os.path.join(workdir, "checkpoints")
        self.directory = self.chief_dir if is_chief else tempfile.mkdtemp(prefix="ckpt_worker_")
        self.last_saved: str | None = None
        self._sync_statistics = sync_statistics
        self._weights_are_finite = weights_are_finite
        self._manager = tf.train.CheckpointManager(state.checkpoint(), self.directory, max_to_keep=max_to_keep)
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
            for path in remove_stale_temporaries(self.chief_dir):
                print(f"Removed {path}, left by an interrupted save", flush=True)
        average = self.state.average
        # A weight average turned on for a run whose checkpoints have none starts from the restored weights.
        average_is_new = average is not None and not holds_object(self.chief_dir, "ema_model")
        try:
            self.last_saved = restore_latest_good(self.state.checkpoint(with_average=not average_is_new),
                                                  self.chief_dir)
        except RuntimeError as error:
            raise SetupError(str(error)) from None
        if average_is_new and self.last_saved:
            average.copy_weights()
            if self.is_chief:
                print("train.ema_decay is new for this run: the weight average starts from the restored weights",
                      flush=True)
        return int(self.state.step.numpy())

    def save(self, step: int, statistics_synced: bool = False) -> None:
        """Checkpoints at `step` on every worker; never writes non-finite weights."""
        if not statistics_synced:
            self._sync_statistics()
        if not self._weights_are_finite():
            raise TrainingError(f"weights became NaN/Inf by step {step}; stopping without saving "
                                f"(the last good checkpoint, {self.last_saved}, is kept)")
        self.state.step.assign(step)
        self.last_saved = self._manager.save(checkpoint_number=step)
        if self.is_chief:
            print(f"Checkpoint at step {step}: {self.last_saved}", flush=True)

    def save_for_evaluator(self, step: int) -> str:
        """Keeps the evaluated weights of the epoch ending at `step` for the sidecar evaluator."""
        return self._epochs.save(checkpoint_number=step)

    def save_best(self, step: int) -> str:
        """Keeps the evaluated weights as the best epoch's (every worker takes part)."""
        return self._best.save(checkpoint_number=step)

    def close(self) -> None:
        if not self.is_chief:
            shutil.rmtree(self.directory, ignore_errors=True)
