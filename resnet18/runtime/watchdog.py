"""Hang watchdog: a training loop that stops making progress must not hang forever.

MultiWorkerMirroredStrategy notices a dead peer (its coordination service misses the
heartbeats), but not a stuck input pipeline, a collective that never completes or a
deadlock in a live process. The loop wraps every training call, evaluation and save
(after the first call, which compiles and may take long) in `watching(what)`: if it
has not returned after `train.step_timeout_seconds`, every thread's Python stack is
written to stderr (the worker's log), and the process exits 138 so that the normal
restart path (the --workers launcher, Kubernetes, Slurm) restarts the group from the
last checkpoint.

    python -m launcher --job JOB --set train.step_timeout_seconds=600
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time

from resnet18.runtime.errors import EXIT_RETRYABLE

BEFORE_HARD_EXIT: list = []  # callables run before the watchdog's os._exit (e.g. flushing a task's log copy)


class Watchdog:
    """Exits the process with code 138 when a watched call runs longer than `timeout` seconds (0: off)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._deadline: float | None = None
        self._what = ""
        self._condition = threading.Condition()
        self._closed = False
        if timeout > 0:
            threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def watching(self, what: str):
        """Arms the watchdog for the duration of the block."""
        if self.timeout <= 0:
            yield
            return
        with self._condition:
            self._deadline, self._what = time.monotonic() + self.timeout, what
            self._condition.notify_all()
        try:
            yield
        finally:
            with self._condition:
                self._deadline = None

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def _watch(self) -> None:
        with self._condition:
            while not self._closed:
                if self._deadline is None:
                    self._condition.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                self._fire()

    def _fire(self) -> None:
        print(f"error: no progress for {self.timeout:g} s in {self._what} (train.step_timeout_seconds); "
              "the stacks of every thread follow; exiting 138 so the job restarts from the last checkpoint",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        sys.stdout.flush()
        for hook in BEFORE_HARD_EXIT:
            hook()
        os._exit(EXIT_RETRYABLE)  # the main thread is stuck: only a hard exit ends the process
