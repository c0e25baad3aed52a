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
    task_of(config).check(config)
    return config
