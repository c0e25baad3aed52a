"""The kinds of training, one registry: `train.task` -> its Task (tasks/task.py).

    classification  supervised: the network's logits against the labels
    distillation    supervised, with a frozen teacher's soft targets (distill.*)
    simclr          self-supervised pre-training of the encoder (simclr.*), kNN monitor

A new task is a module here that builds a Task, and one line in TASKS (and its name in
config.Task). Importing this package does not import TensorFlow: config validation runs
`check` before TensorFlow starts.

    python -c "from resnet18.tasks import TASKS; print(sorted(TASKS))"
"""

from __future__ import annotations

from resnet18.config import Config
from resnet18.registry import lookup
from resnet18.runtime.errors import ConfigError
from resnet18.tasks import classification, distillation, simclr
from resnet18.tasks.task import Task

TASKS: dict[str, Task] = {
    "classification": classification.TASK,
    "distillation": distillation.TASK,
    "simclr": simclr.TASK,
}


def task_of(config: Config) -> Task:
    """The task `train.task` names."""
    return lookup(TASKS, config.train.task, "train.task")


def check(config: Config) -> Config:
    """Refuses the options `config`'s task does not support (ConfigError, exit 2); returns the config."""
    task = task_of(config)
    train = config.train
    if "test_loss" not in task.metrics:  # rules that decide from each epoch's test loss
        needs = [key for key, used in (("train.lr_schedule plateau", train.lr_schedule == "plateau"),
                                       ("train.early_stopping_patience", train.early_stopping_patience > 0)) if used]
        if needs:
            raise ConfigError(f"train.task {task.name} has no test loss to drive {', '.join(needs)} (its "
                              f"test_accuracy is the {task.accuracy})")
    if train.best_checkpoint_metric and train.best_checkpoint_metric not in task.metrics:
        raise ConfigError(f"train.best_checkpoint_metric {train.best_checkpoint_metric}: train.task {task.name} "
                          f"evaluates only {', '.join(task.metrics)}")
    task.check(config)
    return config
