"""WORKDIR/history.jsonl: one JSON line per finished epoch, since step 0, across restarts.

The epoch-end rules (training/epoch_rules.py) replay it on resume, the report plots it and
`launcher.status` reads it, all through `read_history`: a torn line (a crash
mid-write on storage without atomic rename) is skipped with a warning, the same
way for every reader.

    python -c "from resnet18.runtime.history import read_history; print(read_history('runs/cpu_smoke'))"
"""

from __future__ import annotations

import json
import os
from typing import Any

from resnet18.runtime.files import read_json_lines, replace_text

HISTORY_FILE = "history.jsonl"
EVALUATIONS_FILE = "evaluations.jsonl"  # the sidecar evaluator's results, merged into the history by step


def read_history(workdir: str, warn: bool = True) -> list[dict[str, Any]]:
    """The per-epoch entries of WORKDIR/history.jsonl (empty if there are none).

    With sidecar evaluation the test metrics come from WORKDIR/evaluations.jsonl, matched by step.
    """
    entries = read_json_lines(os.path.join(workdir, HISTORY_FILE), warn)
    evaluations = {entry["step"]: entry for entry in read_evaluations(workdir, warn)}
    for entry in entries:
        if "test_accuracy" not in entry and entry["step"] in evaluations:
            found = evaluations[entry["step"]]
            entry.update({key: found[key] for key in ("test_loss", "test_accuracy", "test_examples", "knn_accuracy")
                          if key in found})
    return entries


def read_evaluations(workdir: str, warn: bool = True) -> list[dict[str, Any]]:
    """The sidecar evaluator's entries (step, epoch, test metrics), empty if there are none."""
    return read_json_lines(os.path.join(workdir, EVALUATIONS_FILE), warn)


def write_history(workdir: str, history: list[dict[str, Any]]) -> None:
    """Replaces WORKDIR/history.jsonl with `history`, atomically where the storage allows."""
    # Rewritten whole (object stores such as gs:// cannot append), renamed over the old one: a crash
    # mid-write leaves the previous history, which the epoch rules replay.
    replace_text(os.path.join(workdir, HISTORY_FILE), "".join(json.dumps(entry) + "\n" for entry in history))
