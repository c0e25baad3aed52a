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


class PortInUseError(LauncherError):
    """TensorFlow could not listen on this task's port: another process has it."""

    exit_code = EXIT_PORT_IN_USE


def first_line(error: BaseException, prefer: tuple[str, ...] = ()) -> str:
    """The first non-empty line of an error's message (one containing a `prefer` word first), for one-line errors."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    preferred = [line for line in lines if any(word in line for word in prefer)]
    return (preferred or lines or [type(error).__name__])[0][:300]
