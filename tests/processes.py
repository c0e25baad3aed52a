"""Real processes for fault and operations tests: output collected line by line while they run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

from launcher.cluster import environment_without_cluster
from tests.conftest import REPO


class Running:
    """A process whose merged output is collected line by line while it runs."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, command: list[str] | None = None):
        full_env = environment_without_cluster()
        full_env.update(TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
        command = command or [sys.executable, "-m", "launcher"]
        self.process = subprocess.Popen([*command, *args], cwd=REPO, env=full_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 240, start: int = 0) -> re.Match:
        """Blocks until a line from index `start` on matches `pattern`; returns the match."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matched {pattern!r}:\n" + "\n".join(self.lines[-40:]))
                self._changed.wait(timeout=min(remaining, 1.0))

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self._reader.join(timeout=10)
        return code


def processes_naming(*texts: str) -> list[int]:
    """The pids of the processes whose command line contains every one of `texts`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as stream:
                    command_line = stream.read()
            except OSError:
                continue  # ended meanwhile
            if all(text.encode() in command_line for text in texts):
                found.append(int(entry))
    return found


def cluster_group(args: list[str], workers: int, extra_roles: dict[str, int] | None = None,
                  env: dict[str, str] | None = None) -> dict[str, Running]:
    """Cluster tasks started by hand (as a cluster system would), on free ports of 127.0.0.1, by name."""
    import json

    from launcher.processes import free_ports

    roles = {"worker": workers, **(extra_roles or {})}
    ports = iter(free_ports(sum(roles.values())))
    cluster = {role: [f"127.0.0.1:{next(ports)}" for _ in range(count)] for role, count in roles.items()}
    return {f"{role} {index}": Running(args, dict(env or {}, TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": role, "index": index}})))
            for role, count in roles.items() for index in range(count)}
