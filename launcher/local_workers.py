"""Local multi-worker launch: `python -m launcher --workers N` on one host (what torchrun is to PyTorch).

Starts N worker processes of the same job (and with --evaluator one sidecar
evaluator), each with a generated TF_CONFIG on free ports of 127.0.0.1, and
supervises them:

- Output: each task's complete output goes to WORKDIR/logs/<task>.log, appended
  across restarts, each attempt headed by its number, time and TF_CONFIG; the
  console shows the tasks `--log_workers` selects, prefixed `[worker i]`.
- Signals: SIGINT/SIGTERM are forwarded. During a preemption every worker gets
  `--preemption_grace` seconds (default 60) to finish its checkpoint.
- Failures: the first task to fail *by time* is the cause. The others are stopped
  (SIGTERM, then SIGKILL after 5 s; after the grace period when the first exited
  138, since then its peers are saving or leaving too), and the report names the
  task, its exit code, its last lines and its log file.
- Restarts: after a retryable failure the whole group restarts from the latest
  checkpoint, up to `--max_restarts` times. A worker slot that is the first to fail
  on two starts in a row is dropped while more than `--min_workers` remain: the
  data order does not depend on the number of workers, so the job goes on at the
  same step with the same global batch.
- Ports: a port taken between the probe and TensorFlow's bind (the worker exits
  98) restarts the group on new ports at once, without counting as a restart.
- GPUs: without `--gpus_per_worker` the visible GPUs are split evenly.

    python -m launcher --workers 2 --job tests/jobs/tiny.yaml              # 2 CPU workers
    python -m launcher --workers 4 --min_workers 2 --max_restarts 3 --job JOB
    python -m launcher --workers 2 --evaluator --log_workers 0 --job JOB

Note: TensorFlow's gRPC server listens on every interface whatever address
TF_CONFIG names, and it is unauthenticated (TensorFlow's SECURITY.md); run this
only on hosts whose network you trust.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Callable

from resnet18.runtime.errors import (EXIT_FAILURE, EXIT_PORT_IN_USE, EXIT_RETRYABLE, EXIT_USAGE, LauncherError,
                                     SetupError)
from resnet18.runtime.status import append_event

STOP_GRACE_SECONDS = 5  # SIGTERM -> SIGKILL for the survivors of a genuine failure (their group is broken)
DEFAULT_PREEMPTION_GRACE_SECONDS = 60  # a preempted worker's peers may still be writing their checkpoint
FINISH_GRACE_SECONDS = 120  # after one task succeeds, the others must end within this
POLL_SECONDS = 0.2
TAIL_LINES = 20
PORT_RETRIES = 5
SHRINK_AFTER = 2  # a worker slot that fails first on this many starts in a row is dropped (elastic)
RETRYABLE_EXIT_CODES = (EXIT_RETRYABLE, 130, 137, 143)  # Kubeflow's retryable set
PARENT_PID_VARIABLE = "LAUNCHER_PARENT_PID"  # tells a worker to die with this launcher


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """What `--workers N` runs, and how it supervises it."""

    worker_args: tuple[str, ...]  # arguments of the command for every task
    workers: int
    min_workers: int = 0  # 0: the same as workers (no shrinking)
    gpus_per_worker: int | None = None  # None: split the visible GPUs evenly
    evaluator: bool = False
    log_dir: str | None = None
    workdir: str | None = None  # events.jsonl: group starts, failures with their causes, restarts
    console: frozenset[str] | None = None  # task names shown on the console; None: all
    max_restarts: int = 0
    preemption_grace: float = DEFAULT_PREEMPTION_GRACE_SECONDS
    command: tuple[str, ...] = (sys.executable, "-m", "launcher")
    check_workers: Callable[[int], None] = lambda count: None  # refuses a worker count (e.g. batch not divisible)


@dataclasses.dataclass
class Task:
    """One running process of the group."""

    name: str  # "worker 0", "evaluator"
    process: subprocess.Popen
    tail: collections.deque
    log_path: str | None
    reader: threading.Thread | None = None
    ended: float | None = None  # when the process ended (time.time(), recorded by a waiter thread)

    @property
    def code(self) -> int | None:
        return self.process.returncode if self.ended is not None else None


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a group ended badly: the task that failed first."""

    task: str
    exit_code: int
    last_lines: tuple[str, ...]
    log_path: str | None = None

    def describe(self) -> str:
        how = (f"was killed by {signal.Signals(-self.exit_code).name}" if self.exit_code < 0
               else f"exited with code {self.exit_code}")
        lines = "\n".join(f"    {line}" for line in self.last_lines) or "    (no output)"
        log = f" (full output: {self.log_path})" if self.log_path else ""
        return f"{self.task} {how}: {self.cause}{log}; its last lines:\n{lines}"

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
        return {EXIT_RETRYABLE: "preempted, stalled or lost a peer (retryable)",
                EXIT_USAGE: "config, usage or environment error (not retryable)",
                EXIT_FAILURE: "failed: bug, NaN loss or out of memory (not retryable)",
                EXIT_PORT_IN_USE: "its port was taken (the group restarts on new ports)"}.get(
            self.exit_code, "retryable" if self.retryable else "not retryable")


# --- Set-up: ports, TF_CONFIG, GPUs -----------------------------------------------------

def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on every interface right now (the OS picks them).

    TensorFlow binds its server on all interfaces, so the probe does too; a port taken
    between the probe and that bind makes the worker exit 98 and the group start again.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def local_tf_configs(workers: int, ports: list[int], evaluator: bool = False) -> dict[str, str]:
    """TF_CONFIG per task name of a cluster on 127.0.0.1: workers (worker 0 is chief) and an evaluator."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports[:workers]]}
    if evaluator:  # listed in the cluster as Kubeflow does; it joins no collective
        cluster["evaluator"] = [f"127.0.0.1:{ports[workers]}"]
    configs = {f"worker {rank}": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": rank}})
               for rank in range(workers)}
    if evaluator:
        configs["evaluator"] = json.dumps({"cluster": cluster, "task": {"type": "evaluator", "index": 0}})
    return configs


def visible_gpu_ids(environ=os.environ) -> list[str]:
    """The GPUs of this host a worker could use: CUDA_VISIBLE_DEVICES, else what nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [item.strip() for item in environ["CUDA_VISIBLE_DEVICES"].split(",") if item.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(index) for index, line in enumerate(line for line in listed.splitlines() if line.startswith("GPU "))]


def gpu_slices(workers: int, gpus_per_worker: int | None, visible: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each worker (None: leave the environment as it is).

    Without --gpus_per_worker the visible GPUs are split evenly; 0 means CPU only.

    Raises:
      SetupError: more GPUs asked for than there are, or fewer GPUs than workers.
    """
    if gpus_per_worker is None:
        if not visible:
            return [None] * workers
        if len(visible) < workers:
            raise SetupError(f"--workers {workers} on a host with {len(visible)} GPU(s): give each worker its own "
                             "GPU (fewer workers) or run CPU workers with --gpus_per_worker 0")
        gpus_per_worker = len(visible) // workers
    if gpus_per_worker == 0:
        return [""] * workers
    if gpus_per_worker * workers > len(visible) and visible:
        raise SetupError(f"--workers {workers} x --gpus_per_worker {gpus_per_worker} needs "
                         f"{workers * gpus_per_worker} GPUs; this host shows {len(visible)}")
    ids = visible or [str(index) for index in range(workers * gpus_per_worker)]
    return [",".join(ids[rank * gpus_per_worker:(rank + 1) * gpus_per_worker]) for rank in range(workers)]


def die_with_parent(parent_pid: int) -> None:
    """In a worker: get SIGKILL when the launcher dies, so no worker is orphaned (Linux).

    Called by the worker itself at start-up rather than through Popen's preexec_fn, which
    is unsafe while the launcher runs threads (it may deadlock in the child).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the launcher died before the line above: nothing to serve
        os._exit(EXIT_RETRYABLE)


# --- Running a group --------------------------------------------------------------------

def _pump(task: Task, stream: IO[str], show: bool, lock: threading.Lock) -> None:
    """Copies a task's output to its log file and, if `show`, to the console with its name."""
    log = open(task.log_path, "a", encoding="utf-8") if task.log_path else None
    try:
        for line in iter(stream.readline, ""):
            if log:
                log.write(line)
                log.flush()
            line = line.rstrip("\n")
            task.tail.append(line)
            if show:
                with lock:
                    sys.stdout.write(f"[{task.name}] {line}\n")
                    sys.stdout.flush()
    finally:
        stream.close()
        if log:
            log.close()


def _log_name(name: str) -> str:
    return name.replace(" ", "-") + ".log"


def _start_task(spec: GroupSpec, name: str, tf_config: str, gpus: str | None, attempt: int,
                lock: threading.Lock) -> Task:
    env = dict(os.environ, TF_CONFIG=tf_config, PYTHONUNBUFFERED="1", **{PARENT_PID_VARIABLE: str(os.getpid())})
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    log_path = os.path.join(spec.log_dir, _log_name(name)) if spec.log_dir else None
    if log_path:
        os.makedirs(spec.log_dir, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"===== attempt {attempt}, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"
                      f", TF_CONFIG {tf_config} =====\n")
    process = subprocess.Popen(
        [*spec.command, *spec.worker_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, bufsize=1,
        start_new_session=True)  # signals reach the tasks only through the launcher, once
    task = Task(name, process, collections.deque(maxlen=TAIL_LINES), log_path)
    show = spec.console is None or name in spec.console
    task.reader = threading.Thread(target=_pump, args=(task, process.stdout, show, lock), daemon=True)
    task.reader.start()

    def wait() -> None:  # the time a task ended decides which one failed first
        process.wait()
        task.ended = time.time()

    threading.Thread(target=wait, daemon=True).start()
    return task


def start_group(spec: GroupSpec, workers: int, attempt: int) -> list[Task]:
    """Starts `workers` workers (and the evaluator) on fresh ports."""
    ports = free_ports(workers + int(spec.evaluator))
    configs = local_tf_configs(workers, ports, spec.evaluator)
    gpus = gpu_slices(workers, spec.gpus_per_worker, visible_gpu_ids()) + ([""] if spec.evaluator else [])
    lock = threading.Lock()
    tasks = []
    for (name, tf_config), task_gpus in zip(configs.items(), gpus):
        task = _start_task(spec, name, tf_config, task_gpus, attempt, lock)
        tasks.append(task)
        where = f", CUDA_VISIBLE_DEVICES={task_gpus!r}" if task_gpus else ""
        print(f"Started {name} (pid {task.process.pid}, port {ports[len(tasks) - 1]}{where}"
              + (f", log {task.log_path}" if task.log_path else "") + ")", flush=True)
    return tasks


def stop_tasks(tasks: list[Task], grace: float = STOP_GRACE_SECONDS, signal_first: bool = True) -> None:
    """SIGTERM to every live task (unless `signal_first` is False), SIGKILL to those alive after `grace` s."""
    live = [task for task in tasks if task.process.poll() is None]
    if signal_first:
        for task in live:
            _signal(task, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(task.process.poll() is None for task in live):
        time.sleep(POLL_SECONDS)
    for task in live:
        if task.process.poll() is None:
            _signal(task, signal.SIGKILL)
    for task in tasks:
        task.process.wait()
        if task.reader:
            task.reader.join(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(task.ended is None for task in tasks):
        time.sleep(0.01)


def _signal(task: Task, signum: int) -> None:
    try:
        task.process.send_signal(signum)
    except ProcessLookupError:
        pass


def first_failure(tasks: list[Task]) -> Task | None:
    """The task that failed first by the time it ended (not the first one noticed)."""
    failed = [task for task in tasks if task.code not in (None, 0)]
    return min(failed, key=lambda task: task.ended) if failed else None


def wait_for_group(tasks: list[Task], forwarded: list[int], preemption_grace: float) -> Failure | None:
    """Waits until all tasks end; on the first failure stops the rest. Returns it, or None.

    SIGINT/SIGTERM received meanwhile are forwarded to the tasks and appended to `forwarded`.
    """

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        forwarded.append(signum)
        for task in tasks:
            if task.process.poll() is None:
                _signal(task, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        finish_deadline = None
        while True:
            failed = first_failure(tasks)
            if failed is not None:
                # Preempted (forwarded signal or 138): the others are saving; otherwise the group is broken.
                patient = forwarded or failed.code == EXIT_RETRYABLE
                stop_tasks(tasks, preemption_grace if patient else STOP_GRACE_SECONDS, signal_first=not patient)
                first = first_failure(tasks)  # a task that ended meanwhile may have failed earlier
                return Failure(first.name, first.code, tuple(first.tail), first.log_path)
            codes = [task.code for task in tasks]
            if all(code == 0 for code in codes):
                return None
            if finish_deadline is None and any(code == 0 for code in codes):
                finish_deadline = time.monotonic() + FINISH_GRACE_SECONDS
            if finish_deadline is not None and time.monotonic() > finish_deadline:
                straggler = next(task for task in tasks if task.code is None)
                stop_tasks(tasks)
                return Failure(straggler.name, straggler.process.returncode, tuple(straggler.tail)
                               + (f"(still running {FINISH_GRACE_SECONDS} s after another task finished)",),
                               straggler.log_path)
            time.sleep(POLL_SECONDS)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- The launch loop: restarts, elastic shrinking, ports ----------------------------------

@dataclasses.dataclass
class _Attempts:
    """What the launch loop remembers across starts of the group."""

    workers: int
    restarts: int = 0
    port_retries: int = 0
    first_failures: list[str] = dataclasses.field(default_factory=list)  # per start, the task that failed first


def launch(spec: GroupSpec) -> int:
    """Runs a local multi-worker job to the end; returns the launcher's exit code.

    A SIGINT/SIGTERM to the launcher itself is never retried.
    """
    if spec.workers < 1:
        raise SetupError(f"--workers must be >= 1, got {spec.workers}")
    if os.environ.get("TF_CONFIG", "").strip():
        raise SetupError("--workers starts its own local cluster; unset TF_CONFIG (it is set by cluster systems)")
    attempts = _Attempts(spec.workers)
    while True:
        attempt = attempts.restarts + attempts.port_retries
        print(f"Starting {attempts.workers} local worker(s){' and an evaluator' if spec.evaluator else ''} on 127.0.0.1"
              + (f" (restart {attempts.restarts}/{spec.max_restarts})" if attempts.restarts else ""), flush=True)
        forwarded: list[int] = []
        _event(spec, {"event": "group_start", "attempt": attempt, "workers": attempts.workers,
                      "evaluator": spec.evaluator})
        failure = wait_for_group(start_group(spec, attempts.workers, attempt), forwarded, spec.preemption_grace)
        if failure is None:
            _event(spec, {"event": "group_done", "workers": attempts.workers})
            print(f"All {attempts.workers} worker(s) finished", flush=True)
            return 0
        _event(spec, {"event": "group_failed", "task": failure.task, "exit_code": failure.exit_code,
                      "cause": f"{failure.task} {failure.cause}", "log": failure.log_path,
                      "forwarded_signal": forwarded[0] if forwarded else None})
        if forwarded:
            print(f"error: stopped by {signal.Signals(forwarded[0]).name}; {failure.describe()}",
                  file=sys.stderr, flush=True)
            return EXIT_RETRYABLE if failure.exit_code == EXIT_RETRYABLE else 128 + forwarded[0]
        outcome = _after_failure(spec, attempts, failure)
        if outcome is not None:
            return outcome


def _after_failure(spec: GroupSpec, attempts: _Attempts, failure: Failure) -> int | None:
    """Decides what follows a failed start: None to start again, or the launcher's exit code."""
    if failure.exit_code == EXIT_PORT_IN_USE and attempts.port_retries < PORT_RETRIES:
        attempts.port_retries += 1
        print(f"warning: {failure.task}'s port was taken; starting the group again on new ports", file=sys.stderr,
              flush=True)
        return None
    if not failure.retryable or not spec.max_restarts:
        print(f"error: {failure.describe()}", file=sys.stderr, flush=True)
        return failure.exit_code if failure.exit_code > 0 else EXIT_RETRYABLE
    if attempts.restarts >= spec.max_restarts:
        print(f"error: giving up after {spec.max_restarts} restart(s); last failure: {failure.describe()}",
              file=sys.stderr, flush=True)
        return EXIT_FAILURE
    attempts.restarts += 1
    attempts.first_failures.append(failure.task)
    print(f"warning: {failure.describe()}", file=sys.stderr, flush=True)
    _maybe_shrink(spec, attempts)
    print(f"Restarting the group from the latest checkpoint ({attempts.restarts}/{spec.max_restarts})",
          file=sys.stderr, flush=True)
    return None


def _maybe_shrink(spec: GroupSpec, attempts: _Attempts) -> None:
    """Drops a worker slot that failed first on the last SHRINK_AFTER starts, down to --min_workers."""
    recent = attempts.first_failures[-SHRINK_AFTER:]
    minimum = spec.min_workers or spec.workers
    if len(recent) < SHRINK_AFTER or len(set(recent)) != 1 or not recent[0].startswith("worker"):
        return
    if attempts.workers <= minimum:
        return
    try:
        spec.check_workers(attempts.workers - 1)
    except LauncherError as error:
        print(f"warning: cannot continue on {attempts.workers - 1} worker(s): {error}", file=sys.stderr, flush=True)
        return
    attempts.workers -= 1
    attempts.first_failures.clear()
    _event(spec, {"event": "group_shrink", "workers": attempts.workers, "dropped_after": recent[0]})
    print(f"warning: {recent[0]} failed first on {SHRINK_AFTER} starts in a row: continuing on {attempts.workers} "
          f"worker(s) (--min_workers {minimum}), same global batch, from the latest checkpoint",
          file=sys.stderr, flush=True)


def _event(spec: GroupSpec, event: dict) -> None:
    if spec.workdir:
        append_event(spec.workdir, event)
