"""SIGTERM: exit 138 at once before training starts, an agreed checkpoint once it runs.

Real signals to this process.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from resnet18.runtime.errors import RetryableError
from resnet18.runtime.preemption import PreemptionWatcher


def wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_before_training_a_sigterm_raises_the_retryable_error():
    with PreemptionWatcher():
        with pytest.raises(RetryableError, match="before training started"):
            os.kill(os.getpid(), signal.SIGTERM)
            wait_until(lambda: False, 2.0)  # the handler raises in this thread while it waits


def test_once_armed_a_sigterm_sets_the_flag_and_closing_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        watcher.arm()
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(lambda: watcher.requested)
        assert watcher.requested
    assert signal.getsignal(signal.SIGTERM) is before
