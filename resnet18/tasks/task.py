"""The task seam: everything that makes one kind of training differ from another, in one value.

A task (classification, distillation, SimCLR) is a `Task` built in its own module and
listed once in tasks/__init__.py. The training loop, the checkpointer, the sidecar
evaluator, warm starts and the exports use only this interface and never a task's
name, as TF Model Garden's `Task` and torchtitan's `TrainSpec` do, without a class
hierarchy:

- `check(config)` refuses the options the task does not support (ConfigError, exit 2).
  It runs before TensorFlow is imported, so task modules import TensorFlow inside the
  functions that use it.
- `build_network(config, num_classes, precision)` builds what it trains (and what its
  checkpoints hold): a classifier, or an encoder with a projection head.
- `train_augmentation(config)` is what the input pipeline does to each training batch.
- `make_objective(setting, model, resuming)` returns the per-replica objective
  (images, targets) -> (per-example loss, correct count, examples per global batch);
  the train step averages the loss over the global batch. It and the augmentation go
  through AutoGraph as in any tf.function; the rest of the step is traced as written
  (resnet18/autograph.py).
- `make_evaluation(setting, model, source, sync_statistics)` returns the evaluation run
  after every epoch, inline or in the sidecar evaluator: a dict with test_accuracy,
  test_examples and a confusion matrix, and test_loss where the task has one.
- `sections` names the config sections it reads (beyond runtime, data, model, train):
  their keys marked `must_match` in config.py then belong to the run's identity.
- `heads` are the layers a warm start may leave new; `exports` says what
  launcher.export writes ("classifier" or "encoder"); `accuracy` what its test_accuracy
  measures, for reports; `metrics` what its evaluation returns (the rules that need a
  test loss, a best checkpoint or a sweep's metric are refused for the others).

    python -c "from resnet18.tasks import TASKS; print(sorted(TASKS))"
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from resnet18.config import Config
    from resnet18.data.augment import Augmentation
    from resnet18.data.sources import Source

# (images, targets) -> (per-example loss [b] float32, correct count, examples per global batch)
Objective = Callable[["tf.Tensor", "tf.Tensor"], "tuple[tf.Tensor, tf.Tensor, int]"]
Evaluate = Callable[[], "dict[str, Any]"]


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where a task's parts are built: the run's config, its devices and (in training) its work directory."""

    config: Config
    strategy: tf.distribute.Strategy
    num_classes: int
    precision: str
    workdir: str = ""
    is_chief: bool = True


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of training (see the module docstring for each part)."""

    name: str
    sections: tuple[str, ...]
    heads: tuple[str, ...]
    exports: str  # "classifier" or "encoder"
    accuracy: str  # what test_accuracy measures
    metrics: tuple[str, ...]  # what its evaluation returns: test_accuracy, and test_loss where it has one
    check: Callable[[Config], None]
    build_network: Callable[[Config, int, str], keras.Model]
    train_augmentation: Callable[[Config], Augmentation]
    make_objective: Callable[[Setting, keras.Model, bool], Objective]
    make_evaluation: Callable[[Setting, keras.Model, Source, Callable[[], None]], Evaluate]
