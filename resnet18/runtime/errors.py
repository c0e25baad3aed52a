"""Exit codes and the errors that map to them.

Every way the launcher can end is one of these codes; the README's table and
the cluster job files (Kubernetes `restartPolicy: ExitCode`) rely on them.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # non-retryable: a bug, NaN loss, out of memory
EXIT_USAGE = 2  # bad flag, config, TF_CONFIG, missing devices or data
EXIT_RETRYABLE = 138  # preempted, stalled or peer lost: restart and resume (Kubeflow retries 138)
EXIT_PORT_IN_USE = 98  # this task's TF_CONFIG port was taken (errno EADDRINUSE): start again on another


class LauncherError(Exception):
    """An error the user can act on; its message is printed without a traceback."""

    exit_code = EXIT_FAILURE


class ConfigError(LauncherError):
    """A config key, value, YAML file or flag is wrong."""

    exit_code = EXIT_USAGE


class SetupError(LauncherError):
    """The environment cannot run the job: devices, TPU, TF_CONFIG or data missing."""

    exit_code = EXIT_USAGE


class TrainingError(LauncherError):
    """Training itself failed in a way a restart would not fix (e.g. NaN loss)."""

    exit_code = EXIT_FAILURE


class RetryableError(LauncherError):
    """Preempted or lost a peer: restart every worker and resume from the checkpoint."""

    exit_code = EXIT_RETRYABLE


class PreemptedBeforeTraining(BaseException):
    """SIGTERM before the first training step, raised by the signal handler: exit 138, nothing to save.

    A BaseException, as KeyboardInterrupt is for SIGINT: the handler raises wherever the process happens to be,
    and libraries' `except Exception` (TFDS's lazy builder imports log one and go on) must not swallow the notice.
    """

    exit_code = EXIT_RETRYABLE


class PortInUseError(LauncherError):
    """TensorFlow could not listen on this task's port: another process has it."""

    exit_code = EXIT_PORT_IN_USE


PEER_LOSS_WORDS = ("aborted by", "unhealthy")  # the line of a peer-loss error that names the cause
# An AbortedError with one of these is a collective or a peer giving up (retryable); without, an op that failed.
PEER_WORDS = ("ollective", "aborted by", "unhealthy", "heartbeat", "oordination", "peer", "Socket closed",
              "Connection reset", "onnect")
# TensorFlow's errors for a lost or frozen peer: collectives aborted, the coordination service's heartbeat missed.
PEER_LOSS_ERRORS = ("UnavailableError", "DeadlineExceededError", "CancelledError")


def lost_a_peer(error: BaseException) -> bool:
    """Whether a TensorFlow error is a peer lost or frozen (retryable: 138), not an op that cannot run here (1)."""
    name = type(error).__name__
    return name in PEER_LOSS_ERRORS or (name == "AbortedError" and any(word in str(error) for word in PEER_WORDS))


def first_line(error: BaseException, prefer: tuple[str, ...] = ()) -> str:
    """The first non-empty line of an error's message (one containing a `prefer` word first), for one-line errors."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    preferred = [line for line in lines if any(word in line for word in prefer)]
    return (preferred or lines or [type(error).__name__])[0][:300]
