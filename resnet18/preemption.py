"""Preemption notices: SIGTERM asks the job to checkpoint and exit 138.

Kubernetes, Slurm (`--signal=TERM@...`) and our own `--workers` launcher send
SIGTERM before they kill a process. The handler only sets a flag; the training
loop looks at it between tf.function calls and, when any worker has it set,
every worker saves a checkpoint at the same step and exits with code 138 (the
code Kubeflow's ExitCode policy retries). Agreement is one tiny all-reduce per
loop call, so it works alike for one device, MirroredStrategy and
MultiWorkerMirroredStrategy.

TensorFlow's PreemptionCheckpointHandler is not used: it supports only
MultiWorkerMirroredStrategy and TPUStrategy, wants one step per `run` call on
multi-worker, restores by itself, and exits with code 42, which Kubeflow treats
as permanent.
"""

from __future__ import annotations

import signal
import threading


class PreemptionWatcher:
    """Sets `requested` when SIGTERM arrives (the previous handler is restored on close)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
