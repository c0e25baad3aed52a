"""Registries: one plain dict per kind of thing, filled where the things are defined, read through `lookup`.

    resnet18/models/__init__.py      ARCHITECTURES   model.arch
    resnet18/training/optimizers.py  OPTIMIZERS      train.optimizer
    resnet18/training/schedules.py   SCHEDULES       train.lr_schedule
    resnet18/data/augment.py         AUGMENTATIONS   data.augmentation
    resnet18/data/sources.py         SOURCES         data.source
    resnet18/tasks/__init__.py       TASKS           train.task

The allowed values of each key live in its Literal type in config.py; tests/test_registries.py
builds every one of them, so a value without an entry fails the suite instead of falling
back to a default.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

from resnet18.runtime.errors import ConfigError

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, key: str) -> T:
    """`registry[name]`, or a ConfigError naming the config key and what is registered."""
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(f"{key} {name!r} has no entry; registered: {', '.join(sorted(registry))}") from None
