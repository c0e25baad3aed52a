"""Checkpoint files: which checkpoints a directory holds, and a restore that survives damaged ones.

tf.train.CheckpointManager writes a checkpoint to a temporary name and records it
in the `checkpoint` state file only once it is complete, so a crash mid-save
leaves the previous checkpoint as the latest. What it does not do is fall back
when the latest files are damaged afterwards (truncated copy, full disk, a bad
sync) or the state file is garbage: restoring then fails with DataLossError and
a naive job starts again from step 0. Here every checkpoint found is tried,
newest first, and the first that restores completely wins.

Used by training (resume), warm starts, teachers, the sidecar evaluator, export and status. Listing
checkpoints needs no TensorFlow (status stays light); the functions that read or remove them import it.

    python -c "from resnet18.runtime.checkpoint_files import checkpoint_candidates as c; print(c('runs/x/checkpoints'))"
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from absl import logging

from resnet18.runtime.errors import first_line
from resnet18.runtime.files import list_names

if TYPE_CHECKING:
    import tensorflow as tf

_CHECKPOINT_INDEX = re.compile(r"^(ckpt-(\d+))\.index$")
EPOCHS_DIR = "epoch_checkpoints"  # sidecar evaluation: each epoch's evaluated weights, until evaluated
# An evaluator this many epochs behind (or none at all) loses the oldest: the directory never grows without bound.
EPOCHS_KEPT_FOR_EVALUATOR = 10


def checkpoint_candidates(directory: str) -> list[str]:
    """Checkpoint prefixes in `directory`, newest (highest step) first.

    Read from the files themselves rather than from the `checkpoint` state file,
    which may be the part that is damaged.
    """
    found = []
    for name in list_names(directory):
        match = _CHECKPOINT_INDEX.match(name)
        if match:
            found.append((int(match.group(2)), os.path.join(directory, match.group(1))))
    return [prefix for _, prefix in sorted(found, reverse=True)]


def restore_latest_good(checkpoint: tf.train.Checkpoint, directory: str,
                        skipped: list[str] | None = None) -> str | None:
    """Restores the newest checkpoint of `directory` that reads completely.

    Returns its prefix, or None when the directory holds no checkpoint. Each newer one it could not
    restore is added to `skipped` as "ckpt-N is unreadable: why" (or "does not fit ...": the run's story).

    Raises:
      RuntimeError: checkpoints exist but none can be read (never start over silently).
    """
    candidates = checkpoint_candidates(directory)
    failures = []
    mismatched = 0
    for prefix in candidates:
        status = None
        try:
            status = checkpoint.restore(prefix)
            status.assert_existing_objects_matched()
        except Exception as error:  # DataLossError, IndexError, ValueError...: any damage
            if status is not None:
                status.expect_partial()  # restored, but not every object matched: its leftovers are this error
            reason = first_line(error)
            intact = _files_read(prefix)
            mismatched += intact
            what = "does not fit this model and optimizer" if intact else "is unreadable"
            logging.warning("checkpoint %s %s (%s); trying the previous one", prefix, what, reason)
            print(f"warning: checkpoint {prefix} {what} ({reason}); trying the previous one", flush=True)
            failures.append(f"{os.path.basename(prefix)}: {reason}")
            if skipped is not None:
                skipped.append(f"{os.path.basename(prefix)} {what}: {reason}")
            _quiet_failed_restore(error)
        else:
            return prefix
    return _no_good_checkpoint(directory, candidates, mismatched, failures)


def _quiet_failed_restore(error: BaseException) -> None:
    """Marks the leftovers of a restore that raised partial. TensorFlow keeps its restore coordinator on the
    model's objects (restorations deferred to them) and, when they are deleted, logs one warning per value it
    did not restore (about 150 for a ResNet18) after the one line that says why; expect_partial() silences
    them, and when restore() itself raised, the coordinator is reachable only through the error's frames."""
    traceback = error.__traceback__
    while traceback is not None:
        for value in list(traceback.tb_frame.f_locals.values()):
            if type(value).__name__ == "_CheckpointRestoreCoordinator" and hasattr(value, "expect_partial"):
                value.expect_partial = True
        traceback = traceback.tb_next


def _no_good_checkpoint(directory: str, candidates: list[str], mismatched: int, failures: list[str]) -> None:
    """Raises RuntimeError when checkpoints exist but none was restored."""
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
    import tensorflow as tf

    candidates = checkpoint_candidates(directory)
    if not candidates:
        return True
    try:
        return any(key.startswith(f"{name}/") for key, _ in tf.train.list_variables(candidates[0]))
    except Exception:  # damaged: restore_latest_good will fall back and explain
        return True


def evaluated_weights(directory: str, ema_decay: float) -> str:
    """The object of `directory`'s training checkpoints that holds the weights a run evaluates: the weight
    average when config.yaml keeps one and the newest checkpoint saved it, else `model` (train.ema_decay
    turned on at a resume that has not saved since: config.yaml already says so)."""
    return "ema_model" if ema_decay and holds_object(directory, "ema_model") else "model"


def leading_dimension(directory: str, name: str) -> int | None:
    """The first dimension of the variables the newest checkpoint of `directory` saved under object `name`
    (None when it saved none, or when it cannot tell)."""
    import tensorflow as tf

    candidates = checkpoint_candidates(directory)
    try:
        shapes = [shape for key, shape in tf.train.list_variables(candidates[0])
                  if key.startswith(f"{name}/")] if candidates else []
    except Exception:  # damaged: restore_latest_good will fall back and explain
        return None
    return shapes[0][0] if shapes and shapes[0] else None


def _files_read(prefix: str) -> bool:
    """True if the checkpoint's files read completely (so a failed restore means a layout mismatch)."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
        return True
    except Exception:
        return False


def remove_checkpoint(prefix: str) -> None:
    """Deletes a checkpoint's files; ones another process removed meanwhile (the chief and the sidecar
    evaluator both remove epoch checkpoints) are not an error."""
    import tensorflow as tf

    for name in tf.io.gfile.glob(prefix + ".*"):
        try:
            tf.io.gfile.remove(name)
        except tf.errors.NotFoundError:
            pass


def remove_stale_temporaries(directory: str) -> list[str]:
    """Deletes `*_temp*` leftovers of interrupted saves (never restored, safe to remove)."""
    import tensorflow as tf

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
