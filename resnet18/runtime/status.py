"""What a run is doing, on disk: WORKDIR/status.json (the chief's heartbeat) and WORKDIR/events.jsonl.

- status.json is rewritten by the chief at most every HEARTBEAT_SECONDS while it
  trains (step, epoch, images/s over the last calls, time), at once around each call
  its watchdog does not time (state "compiling": the first of each kind traces and
  compiles), and once more when it ends (done, stopped early, preempted, failed). The
  sidecar evaluator reads it to tell a slow chief from a lost one; `python -m launcher.status` reads it to say
  how the run is going.
- events.jsonl gets one line per start and end of a task that can say so (the
  chief's training, the sidecar evaluator, the --workers launcher's group starts,
  failures with their causes and restarts), so the story of restarts survives them.

Both are small JSON files written whole and renamed into place (gs:// work
directories included), readable by anyone who sees the work directory.

    python -m launcher.status --workdir runs/cpu_smoke
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from resnet18.runtime.files import append_text, read_json, read_json_lines, write_json

STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"
HEARTBEAT_SECONDS = 5.0
# Beyond train.step_timeout_seconds, for a chief not yet past its first step: start-up, data preparation,
# tracing and compiling, which its watchdog does not time.
STARTUP_SECONDS = 600.0
SPEED_WINDOW = 30  # training calls over which images/s is averaged


def append_event(workdir: str, event: dict[str, Any]) -> None:
    """Adds one line to WORKDIR/events.jsonl (rewritten whole: object stores cannot append)."""
    append_events(workdir, [event])


def append_events(workdir: str, events: list[dict[str, Any]]) -> None:
    """Adds the events in one rewrite, each with its own "time" if it has one (else now)."""
    path = os.path.join(workdir, EVENTS_FILE)
    lines = "".join(json.dumps({"time": time.time(), **event}) + "\n" for event in events)
    append_text(path, lines)


def read_events(workdir: str) -> list[dict[str, Any]]:
    return read_json_lines(os.path.join(workdir, EVENTS_FILE))  # a torn line is skipped: the rest tells the story


def read_status(workdir: str) -> dict[str, Any] | None:
    return read_json(os.path.join(workdir, STATUS_FILE))


UNTIMED_STATES = ("starting", "compiling")  # the chief traces and compiles; its watchdog does not time that
FINISHED_STATES = ("done", "stopped_early")  # the chief's last heartbeat: it trained to its end


def heartbeat_allowance(step_timeout: float, state: str | None) -> float | None:
    """How old a healthy chief's heartbeat may get in `state` (None: no limit, as when train.step_timeout_seconds
    is 0 or the chief finished training and writes no more).

    The watchdog bounds every training call, evaluation and save by train.step_timeout_seconds, and the
    heartbeat is written at most every HEARTBEAT_SECONDS after a call; before its first step, and in the
    first call of each kind (state "compiling": tracing, untimed by the watchdog), a chief gets
    STARTUP_SECONDS instead of HEARTBEAT_SECONDS.
    """
    if not step_timeout or state in FINISHED_STATES:
        return None
    return step_timeout + (STARTUP_SECONDS if state in UNTIMED_STATES else HEARTBEAT_SECONDS)


class Heartbeat:
    """The chief's status.json: written at most every HEARTBEAT_SECONDS, and at the end (no-op elsewhere)."""

    def __init__(self, workdir: str, is_chief: bool, total_steps: int, steps_per_epoch: int, start_step: int = 0):
        self.path = os.path.join(workdir, STATUS_FILE)
        self.enabled = is_chief
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self._written = 0.0
        self.last_step = start_step  # a resumed run's first write (compiling its first call) says where it stands
        self._calls: collections.deque = collections.deque(maxlen=SPEED_WINDOW)  # (images, seconds)
        self._fields: dict[str, Any] = {"state": "starting", "pid": os.getpid(), "host": socket.gethostname(),
                                        "started": time.time()}

    def beat(self, step: int, images: int = 0, seconds: float = 0.0, state: str = "training",
             force: bool = False) -> None:
        """Records progress at `step` (and the images/seconds of the call that got there)."""
        if not self.enabled:
            return
        self.last_step = step
        if seconds:
            self._calls.append((images, seconds))
        now = time.time()
        if not force and now - self._written < HEARTBEAT_SECONDS:
            return
        images_sum, seconds_sum = (sum(column) for column in zip(*self._calls)) if self._calls else (0, 0.0)
        self._fields.update(state=state, step=step, epoch=step // self.steps_per_epoch,
                            total_steps=self.total_steps, updated=now,
                            images_per_sec=images_sum / seconds_sum if seconds_sum else None)
        write_json(self.path, self._fields)
        self._written = now

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """Says at once, for the block, that a call its watchdog does not time runs: the first of its kind
        traces and compiles (minutes on a loaded machine), so the evaluator and `status` allow STARTUP_SECONDS."""
        self.beat(self.last_step, state="compiling", force=True)
        yield
        self.beat(self.last_step, force=True)

    def end(self, step: int, state: str, detail: str = "") -> None:
        """The last word: done, stopped_early, preempted or failed."""
        if self.enabled:
            self._fields["detail"] = detail
            self.beat(step, state=state, force=True)
