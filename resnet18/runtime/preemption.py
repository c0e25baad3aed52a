"""Preemption notices: SIGTERM asks the job to checkpoint and exit 138.

Kubernetes, Slurm (`--signal=TERM@...`) and our own `--workers` launcher send
SIGTERM before they kill a process. Two phases:

- Before the first training step (imports, data preparation, restore, tracing)
  there is nothing to save: SIGTERM raises `PreemptedBeforeTraining` at once, so
  the process exits 138 cleanly instead of dying by the signal's default action.
  It is a BaseException, which no library's `except Exception` swallows; should
  one catch it all the same, the notice is kept and the first loop call honours it.
- Once training runs (`arm()`), the handler only sets a flag; the loop looks at
  it between tf.function calls and, when any worker has it set, every worker
  saves a checkpoint at the same step and exits 138 (the code Kubeflow's
  ExitCode policy retries). Agreement is one tiny all-reduce per loop call, so
  it works alike for one device, MirroredStrategy and MultiWorkerMirroredStrategy.

TensorFlow's PreemptionCheckpointHandler is not used: it supports only
MultiWorkerMirroredStrategy and TPUStrategy, wants one step per `run` call on
multi-worker, restores by itself, and exits with code 42, which Kubeflow treats
as permanent.
"""

from __future__ import annotations

import signal
import threading

from resnet18.runtime.errors import PreemptedBeforeTraining


def preempted_before_training(signum=None, frame=None) -> None:  # noqa: ARG001 - signal handler signature
    """SIGTERM handler for the time before training starts: nothing to save, exit 138."""
    raise PreemptedBeforeTraining("preempted (SIGTERM) before training started; nothing to save; run again to start")


def evaluator_stopped(signum=None, frame=None) -> None:  # noqa: ARG001 - signal handler signature
    """SIGTERM handler of the sidecar evaluator, which never has anything to save: exit 138."""
    raise PreemptedBeforeTraining("evaluator stopped (SIGTERM); it has nothing to save: run the job again and it "
                                  "goes on from the epochs it has not evaluated")


def _decided(signum=None, frame=None) -> None:  # noqa: ARG001 - signal handler signature
    """SIGTERM handler once training has ended: the exit code is decided; the notice changes nothing."""


# Where TensorFlow's own SIGTERM handler (the coordination service's preemption notifier, installed as a
# MultiWorkerMirroredStrategy group forms, until launcher/strategy.py takes the signal back) records a notice.
TENSORFLOW_NOTICE_KEY = "TF_DEFAULT_PREEMPTION_NOTICE_KEY"


def notice_taken_by_tensorflow() -> bool:
    """Whether a task of this group got a SIGTERM while TensorFlow's handler was installed instead of ours."""
    from tensorflow.python.eager import context

    if not context.context().coordination_service:
        return False  # no coordination service (one process): TensorFlow installed no handler
    try:
        # Absent, the lookup waits out its deadline: one second, once per start, enough for the leader's answer.
        return bool(context.context().get_config_key_value(TENSORFLOW_NOTICE_KEY, timeout_in_ms=1000))
    except Exception:  # noqa: BLE001 - absent: DeadlineExceeded or NotFound, whichever this version raises
        return False


class PreemptionWatcher:
    """Watches for SIGTERM (the previous handler is restored on close).

    Until `arm()` a SIGTERM raises PreemptedBeforeTraining (nothing to save yet); afterwards it sets
    `requested`, which the training loop turns into an agreed checkpoint and exit 138.
    """

    def __init__(self) -> None:
        self.requested = False
        self.armed = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def arm(self) -> None:
        """From now on SIGTERM only asks for an agreed checkpoint (training has started)."""
        self.armed = True
        if notice_taken_by_tensorflow():
            self.requested = True

    def _handle(self, signum, frame) -> None:
        self.requested = True  # first: kept even if the exception below is caught on its way out
        if not self.armed:
            preempted_before_training(signum, frame)

    def close(self) -> None:
        if self._previous is not None:
            # Once training has started, "before training" is over: a later notice (a second one, srun ending
            # the step) must not raise it wherever the process is on its way out, even in a finally or a
            # __del__, and turn a decided exit (138 on its way, or the end of training) into death by SIGTERM.
            after = _decided if self.armed and self._previous is preempted_before_training else self._previous
            signal.signal(signal.SIGTERM, after)
            self._previous = None

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
