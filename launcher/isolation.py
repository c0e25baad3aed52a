"""A private network for a local worker group: `--workers N` in a network namespace of its own.

TensorFlow's distributed runtime has no authentication (tensorflow/tensorflow#11689: it is
"designed to run on private networks"), and its gRPC server listens on every interface,
whatever address TF_CONFIG names. A local group needs nothing but 127.0.0.1, so on Linux
the launcher runs the whole group (its supervisor, the workers and the evaluator) inside
a network namespace of its own, made with util-linux's `unshare --net` (as root) or
`unshare --net --map-root-user` (an unprivileged user namespace), where only its loopback
exists: nothing outside the group can reach the workers' servers.

What needs the network happens outside, before the group starts: the data set is
prepared there (`python -m launcher.prepare`: a download, or the stand-in), so the
workers find it ready. A run that reads or writes a URL (gs://...) during training needs
the network throughout and cannot be isolated. `--worker_network`:

    auto     private where a namespace can be made, else the host's network, saying why (default)
    private  private, or exit 2 saying why it cannot be
    host     the host's network (the workers reachable from outside: profilers, debuggers)

    python -m launcher --workers 2 --job jobs/cpu_smoke.yaml --dry_run     # says which it will be
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys

from resnet18.config import Config
from resnet18.runtime.errors import EXIT_RETRYABLE, ConfigError

MODES = ("auto", "private", "host")
INSIDE_VARIABLE = "LAUNCHER_PRIVATE_NETWORK"  # set for the supervisor that runs inside the namespace
PROBE_TIMEOUT_SECONDS = 10
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where the group's network will be, and why."""

    private: bool
    why: str
    command: tuple[str, ...] = ()  # the unshare command that makes the namespace

    def describe(self) -> str:
        if self.private:
            return f"worker network: private ({self.why}: nothing outside the group reaches the workers' servers)"
        return f"worker network: host ({self.why}; TensorFlow's servers listen on every interface)"


def decide(mode: str, config: Config, workdir: str) -> Decision:
    """The network of a `--workers` group under `--worker_network MODE`.

    Raises:
      ConfigError: MODE is private and no private network can be made here (exit 2), or MODE is unknown.
    """
    if mode not in MODES:
        raise ConfigError(f"--worker_network {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "host":
        return Decision(False, "--worker_network host")
    why_not = _why_not(config, workdir)
    command = () if why_not else namespace_command()
    if command:
        return Decision(True, f"a network namespace of its own, made with {' '.join(command)}", command)
    why_not = why_not or ("neither `unshare --net` nor `unshare --net --map-root-user` is allowed here (a container "
                          "without user namespaces, say)")
    if mode == "private":
        raise ConfigError(f"--worker_network private: {why_not}; use --worker_network host (TensorFlow's servers "
                          "then listen on every interface) or auto")
    return Decision(False, f"no private network: {why_not}")


def _why_not(config: Config, workdir: str) -> str:
    """Why this run cannot go without the network, or ""."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if shutil.which("unshare") is None:
        return "util-linux's unshare is not installed"
    paths = {"--workdir": workdir, "data.data_dir": config.data.data_dir,
             "data.image_folder": config.data.image_folder, "train.init_from": config.train.init_from,
             "distill.teacher_workdir": config.distill.teacher_workdir}
    remote = [f"{key} {path}" for key, path in paths.items() if path and "://" in path]
    return f"{', '.join(remote)} needs the network during training" if remote else ""


def namespace_command() -> tuple[str, ...]:
    """The first unshare command that works here (as root, then in an unprivileged user namespace), or ()."""
    for command in (("unshare", "--net"), ("unshare", "--net", "--map-root-user")):
        try:
            probe = subprocess.run([*command, "true"], capture_output=True, timeout=PROBE_TIMEOUT_SECONDS)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return command
    return ()


def run_inside(decision: Decision, argv: list[str]) -> int:
    """Runs this launcher again, with the same arguments, inside the namespace; returns its exit code.

    SIGINT and SIGTERM are passed on; the supervisor inside dies with this process.
    """
    env = dict(os.environ, **{INSIDE_VARIABLE: str(os.getpid())})
    children: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        received.append(signum)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    # Installed before the start: a signal that arrives meanwhile is passed on once the child exists.
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        children.append(subprocess.Popen([*decision.command, "--", sys.executable, "-m", "launcher", *argv],
                                         env=env))
        for signum in received:
            with contextlib.suppress(ProcessLookupError):
                children[0].send_signal(signum)
        code = children[0].wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code >= 0:
        return code
    # Killed by a signal (sys.exit of a negative code would turn it into 241): the forwarded SIGTERM kills a
    # launcher still starting, with nothing to save, which is a preemption like any other.
    return EXIT_RETRYABLE if received and -code == signal.SIGTERM else 128 - code


def bring_up_loopback() -> None:
    """Inside a new network namespace the loopback interface exists but is down: bring it up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        import fcntl

        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
