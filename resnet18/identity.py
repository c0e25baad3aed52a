"""Run identity, one mechanism: which config keys must be equal for two runs to be "the same" in some way.

    RESUME      a work directory's checkpoints keep their meaning (the model, the data order,
                what a step is): a resumed run may not change these keys (training/run_config.py)
    WARM_START  train.init_from: the other run's encoder fits this network layer for layer
                (training/weights.py)
    TEACHER     distillation: the teacher was trained on the student's data (tasks/distillation.py)

A config field says which identities it belongs to with `metadata=must_match(...)` (config.py);
a section's mark covers all its keys. The keys of a section that only some tasks read
(distill, simclr) count only for a task that reads it (tasks/task.py: Task.sections).
`differences` lists what breaks an identity; `resume_changes` also lists the harmless rest.

    python -c "from resnet18 import identity as i, config as c; print(i.differences(c.Config(), c.Config(), i.RESUME))"
"""

from __future__ import annotations

import dataclasses
from typing import Any

RESUME = "resume"
WARM_START = "warm_start"
TEACHER = "teacher"
ALWAYS_READ = ("runtime", "data", "model", "train")  # the sections every task reads


def must_match(*kinds: str) -> dict[str, frozenset[str]]:
    """Field metadata: the identities (RESUME, WARM_START, TEACHER) this key belongs to."""
    return {"must_match": frozenset(kinds)}


def differences(first: Any, second: Any, kind: str, sections: tuple[str, ...] = ()) -> list[str]:
    """The keys marked must_match(kind) that differ, as "key: first -> second".

    Only the always-read sections and `sections` (the ones a task reads) are compared.
    """
    return [change for change, matters in _changes(first, second, kind, sections) if matters]


def resume_changes(saved: Any, new: Any, sections: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(refused, allowed): the keys that differ between the config of a work directory's
    checkpoints and a new one, as "key: old -> new", split by whether they may change (RESUME)."""
    refused, allowed = [], []
    for change, matters in _changes(saved, new, RESUME, sections):
        (refused if matters else allowed).append(change)
    return refused, allowed


def _changes(first: Any, second: Any, kind: str, sections: tuple[str, ...], prefix: str = "",
             marked: bool = False, read: bool = True) -> list[tuple[str, bool]]:
    """(change, whether it breaks `kind`) for every key that differs."""
    found = []
    for field in dataclasses.fields(first):
        key, old, value = f"{prefix}{field.name}", getattr(first, field.name), getattr(second, field.name)
        in_use = read and (bool(prefix) or field.name in ALWAYS_READ or field.name in sections)
        is_marked = marked or kind in field.metadata.get("must_match", ())
        if dataclasses.is_dataclass(old):
            found += _changes(old, value, kind, sections, f"{key}.", is_marked, in_use)
        elif old != value:
            found.append((f"{key}: {old!r} -> {value!r}", in_use and is_marked))
    return found
