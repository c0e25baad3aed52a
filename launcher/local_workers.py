"""Local multi-worker launch: `python -m launcher --workers N` on one host.

TensorFlow has no torchrun; this is ours. It starts N worker processes of the
same job, each with a generated TF_CONFIG on free ports of 127.0.0.1, prefixes
their output with the worker's rank, forwards SIGINT/SIGTERM to all of them and
waits. It exits 0 only when every worker exited 0. When one worker fails, the
others are stopped (SIGTERM, then SIGKILL after 5 s) within 30 seconds and the launcher
exits non-zero, naming the worker, its exit code and its last lines.

    python -m launcher --workers 2 --job tests/jobs/tiny.yaml      # 2 CPU workers
    python -m launcher --workers 2 --gpus_per_worker 4 --job JOB   # 2 x 4 GPUs

Note: TensorFlow's gRPC server listens on every interface whatever address
TF_CONFIG names, and it is unauthenticated (TensorFlow's SECURITY.md); run this
only on hosts whose network you trust.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from resnet18.errors import EXIT_FAILURE, EXIT_RETRYABLE, EXIT_USAGE, SetupError

STOP_GRACE_SECONDS = 5  # SIGTERM -> SIGKILL for the survivors of a failed worker (their group is broken)
FINISH_GRACE_SECONDS = 120  # after one worker succeeds, the others must end within this
POLL_SECONDS = 0.2
TAIL_LINES = 20
RETRYABLE_EXIT_CODES = (EXIT_RETRYABLE, 130, 137, 143)  # Kubeflow's retryable set


@dataclasses.dataclass
class Worker:
    """One worker process and what it last printed."""

    rank: int
    process: subprocess.Popen
    tail: collections.deque
    reader: threading.Thread


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a group of workers ended badly."""

    rank: int
    exit_code: int
    last_lines: tuple[str, ...]

    def describe(self) -> str:
        if self.exit_code < 0:
            how = f"was killed by {signal.Signals(-self.exit_code).name}"
        else:
            how = f"exited with code {self.exit_code}"
        lines = "\n".join(f"    {line}" for line in self.last_lines) or "    (no output)"
        return f"worker {self.rank} {how}: {self.cause}; its last lines:\n{lines}"

    @property
    def retryable(self) -> bool:
        """Killed by a signal, preempted or peer lost: a restart from the checkpoint can fix it.

        Exit 1 (bug, NaN, out of memory) and 2 (config, environment) would fail again.
        """
        return self.exit_code < 0 or self.exit_code in RETRYABLE_EXIT_CODES

    @property
    def cause(self) -> str:
        if self.exit_code < 0:
            return "killed (retryable)"
        return {EXIT_RETRYABLE: "preempted or lost a peer (retryable)",
                EXIT_USAGE: "config, usage or environment error (not retryable)",
                EXIT_FAILURE: "failed: bug, NaN loss or out of memory (not retryable)"}.get(
            self.exit_code, "retryable" if self.retryable else "not retryable")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def local_tf_configs(num_workers: int, ports: list[int]) -> list[str]:
    """TF_CONFIG for each worker of a workers-only cluster on 127.0.0.1 (worker 0 is chief)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": rank}})
            for rank in range(num_workers)]


def visible_gpus(rank: int, gpus_per_worker: int | None) -> str | None:
    """CUDA_VISIBLE_DEVICES for a worker: its own slice of the host's GPUs, or none."""
    if gpus_per_worker is None:
        return None
    if gpus_per_worker == 0:
        return ""  # CPU only
    first = rank * gpus_per_worker
    return ",".join(str(index) for index in range(first, first + gpus_per_worker))


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the launcher dies, so no worker is orphaned."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pump(stream: IO[str], prefix: str, tail: collections.deque, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        tail.append(line)
        with lock:
            sys.stdout.write(f"{prefix}{line}\n")
            sys.stdout.flush()
    stream.close()


def start_workers(worker_args: list[str], num_workers: int, gpus_per_worker: int | None) -> list[Worker]:
    """Starts the worker processes; each runs `python -m launcher WORKER_ARGS`."""
    ports = free_ports(num_workers)
    configs = local_tf_configs(num_workers, ports)
    lock = threading.Lock()
    workers = []
    for rank in range(num_workers):
        env = dict(os.environ, TF_CONFIG=configs[rank], PYTHONUNBUFFERED="1")
        gpus = visible_gpus(rank, gpus_per_worker)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        process = subprocess.Popen(
            [sys.executable, "-m", "launcher", *worker_args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,  # signals reach workers only through us, once
            preexec_fn=_die_with_parent,
        )
        tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
        reader = threading.Thread(target=_pump, args=(process.stdout, f"[worker {rank}] ", tail, lock), daemon=True)
        reader.start()
        workers.append(Worker(rank, process, tail, reader))
        print(f"Started worker {rank} (pid {process.pid}, TF_CONFIG task worker:{rank}, "
              f"port {ports[rank]})", flush=True)
    return workers


def stop_workers(workers: list[Worker], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to every live worker, SIGKILL to those still alive after `grace` seconds."""
    live = [worker for worker in workers if worker.process.poll() is None]
    for worker in live:
        _signal(worker, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(worker.process.poll() is None for worker in live):
        time.sleep(POLL_SECONDS)
    for worker in live:
        if worker.process.poll() is None:
            _signal(worker, signal.SIGKILL)
    for worker in workers:
        worker.process.wait()
        worker.reader.join(timeout=5)


def _signal(worker: Worker, signum: int) -> None:
    try:
        worker.process.send_signal(signum)
    except ProcessLookupError:
        pass


def wait_for_workers(workers: list[Worker], forwarded: list[int]) -> Failure | None:
    """Waits until all workers end; on the first failure stops the rest. Returns it, or None.

    SIGINT/SIGTERM received meanwhile are forwarded to the workers and appended to `forwarded`.
    """

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        forwarded.append(signum)
        for worker in workers:
            if worker.process.poll() is None:
                _signal(worker, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        finish_deadline = None
        while True:
            codes = [worker.process.poll() for worker in workers]
            failed = [worker for worker, code in zip(workers, codes) if code not in (None, 0)]
            if failed:
                # A worker killed by a signal is the cause more likely than one that saw it die.
                first = min(failed, key=lambda worker: (worker.process.returncode > 0, worker.rank))
                stop_workers(workers)
                return Failure(first.rank, first.process.returncode, tuple(first.tail))
            if all(code == 0 for code in codes):
                for worker in workers:
                    worker.reader.join(timeout=5)
                return None
            if finish_deadline is None and any(code == 0 for code in codes):
                finish_deadline = time.monotonic() + FINISH_GRACE_SECONDS
            if finish_deadline is not None and time.monotonic() > finish_deadline:
                straggler = next(worker for worker, code in zip(workers, codes) if code is None)
                stop_workers(workers)
                return Failure(straggler.rank, straggler.process.returncode, tuple(straggler.tail)
                               + (f"(still running {FINISH_GRACE_SECONDS} s after another worker finished)",))
            time.sleep(POLL_SECONDS)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def launch(worker_args: list[str], num_workers: int, gpus_per_worker: int | None = None,
           max_restarts: int = 0) -> int:
    """Runs a local multi-worker job to the end; returns the launcher's exit code.

    After a retryable failure (a worker killed, preempted or cut off from its peers) the
    whole group is restarted, up to `max_restarts` times; the workers resume from the
    chief's latest checkpoint. A SIGINT/SIGTERM to the launcher itself is never retried.
    """
    if num_workers < 1:
        raise SetupError(f"--workers must be >= 1, got {num_workers}")
    if os.environ.get("TF_CONFIG", "").strip():
        raise SetupError("--workers starts its own local cluster; unset TF_CONFIG (it is set by cluster systems)")
    attempt = 0
    while True:
        print(f"Starting {num_workers} local workers on 127.0.0.1"
              + (f" (restart {attempt}/{max_restarts})" if attempt else ""), flush=True)
        forwarded: list[int] = []
        failure = wait_for_workers(start_workers(worker_args, num_workers, gpus_per_worker), forwarded)
        if failure is None:
            print(f"All {num_workers} workers finished", flush=True)
            return 0
        if forwarded:
            print(f"error: stopped by {signal.Signals(forwarded[0]).name}; {failure.describe()}",
                  file=sys.stderr, flush=True)
            return EXIT_RETRYABLE if failure.exit_code == EXIT_RETRYABLE else 128 + forwarded[0]
        if failure.retryable and attempt < max_restarts:
            attempt += 1
            print(f"warning: {failure.describe()}\nRestarting all {num_workers} workers from the latest "
                  f"checkpoint ({attempt}/{max_restarts})", file=sys.stderr, flush=True)
            continue
        if failure.retryable and max_restarts:
            print(f"error: giving up after {max_restarts} restart(s); last failure: {failure.describe()}",
                  file=sys.stderr, flush=True)
            return EXIT_FAILURE
        print(f"error: {failure.describe()}", file=sys.stderr, flush=True)
        return failure.exit_code if failure.exit_code > 0 else EXIT_RETRYABLE
