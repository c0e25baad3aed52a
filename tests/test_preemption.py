"""SIGTERM sets the preemption flag (a real signal to this process) and the old handler comes back."""

from __future__ import annotations

import os
import signal
import time

from resnet18.preemption import PreemptionWatcher


def test_a_real_sigterm_sets_the_flag_and_closing_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert not watcher.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not watcher.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.requested
    assert signal.getsignal(signal.SIGTERM) is before
