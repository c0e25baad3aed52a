"""Epoch-end rules of Keras' `Model.fit` callbacks, as pure functions of the history.

ReduceLROnPlateau, EarlyStopping and "keep the best checkpoint" decide from the
validation metrics of the epochs so far. Computing each decision from the whole
per-epoch history (WORKDIR/history.jsonl) instead of keeping callback state makes
them survive restarts for free: a resumed run replays the recorded epochs and
reaches the decisions the uninterrupted run reached. The rules follow Keras 3's
callbacks exactly (mode "min" for losses, "max" for accuracies).

    python -m launcher --job jobs/keras_tutorial_recipe.yaml   # uses all three
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from resnet18.runtime.errors import ConfigError

if TYPE_CHECKING:
    from resnet18.config import TrainConfig

HIGHER_IS_BETTER = {"test_accuracy": True, "test_loss": False}


def _improved(current: float, best: float | None, min_delta: float, higher_is_better: bool) -> bool:
    if best is None:
        return True
    return current - min_delta > best if higher_is_better else current + min_delta < best


def plateau_scale(losses: Sequence[float], factor: float, patience: int, min_delta: float = 1e-4,
                  min_scale: float = 0.0) -> float:
    """The learning-rate multiplier after these epochs' validation losses (Keras ReduceLROnPlateau).

    Every `patience` epochs in a row without an improvement of more than `min_delta`
    multiply the rate by `factor` (no cooldown, as in the Keras default).
    """
    scale, best, wait = 1.0, None, 0
    for loss in losses:
        if _improved(loss, best, min_delta, higher_is_better=False):
            best, wait = loss, 0
            continue
        wait += 1
        if wait >= patience:
            scale, wait = max(scale * factor, min_scale), 0
    return scale


def early_stop_epoch(losses: Sequence[float], patience: int, min_delta: float = 0.0) -> int | None:
    """The 1-based epoch after which Keras EarlyStopping(patience) stops training, or None."""
    best, wait = None, 0
    for epoch, loss in enumerate(losses, start=1):
        wait += 1
        if _improved(loss, best, min_delta, higher_is_better=False):
            best, wait = loss, 0
            continue
        if wait >= patience and epoch > 1:
            return epoch
    return None


def best_epoch(history: Sequence[dict[str, Any]], metric: str) -> int | None:
    """Index in `history` of the best epoch by `metric` (the first of equals), or None if empty."""
    best_index, best = None, None
    for index, entry in enumerate(history):
        if _improved(entry[metric], best, 0.0, HIGHER_IS_BETTER[metric]):
            best_index, best = index, entry[metric]
    return best_index


def check_replayable(history: Sequence[dict[str, Any]], train: TrainConfig, where: str) -> None:
    """Refuses rules that replay a metric some recorded epoch lacks: epochs trained with sidecar evaluation
    that its evaluator never evaluated (none ran, it fell behind, it stopped), resumed with inline evaluation.

    Raises:
      ConfigError: naming the key that turns the rule on, the metric and the epochs (exit 2).
    """
    needed = {}  # metric -> the key whose rule replays it
    if train.best_checkpoint_metric:
        needed[train.best_checkpoint_metric] = "train.best_checkpoint_metric"
    if train.early_stopping_patience:
        needed["test_loss"] = "train.early_stopping_patience"
    if train.lr_schedule == "plateau":
        needed["test_loss"] = "train.lr_schedule plateau"
    for metric, key in needed.items():
        missing = [entry["epoch"] for entry in history if metric not in entry]
        if missing:
            raise ConfigError(f"{key} replays every recorded epoch's {metric}, and epoch(s) {missing} in {where} "
                              "have none (trained with train.evaluation sidecar and never evaluated): resume "
                              "without it, or start in another --workdir")
