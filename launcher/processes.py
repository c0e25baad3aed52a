"""The processes of a local group (`--workers N`): slots, start, output, liveness, stop, failures.

- A slot is one worker's place in the group, kept across restarts: its name ("worker 2",
  the number it had when the job first started), its GPUs and its log file. On every
  start the live slots get the ranks 0..M-1 of a fresh TF_CONFIG on free ports of
  127.0.0.1, in slot order (the first is the chief); a dropped slot takes its GPUs and
  its name with it, and the others keep theirs.
- Each task's complete output goes to WORKDIR/logs/<task>.log (appended across
  restarts, each attempt headed by its number, time and TF_CONFIG) and, if chosen,
  to the console prefixed `[worker 2]`.
- Liveness: every task touches its own file (WORKDIR/logs/<task>.alive) every
  ALIVE_SECONDS from a thread of its own, so a frozen process (stopped, swapped out,
  deadlocked holding the interpreter) shows a stale file while the healthy ones,
  blocked in a collective that waits for it, keep theirs fresh: the launcher blames a
  hang on the stale one, not on the first whose watchdog fired. While the group forms,
  TensorFlow holds a waiting task's interpreter: the task says so in its file first, and
  is blamed only when every task waits.
- Failures are ordered by the time each process ended (a waiter thread records it).

    python -m launcher --workers 3 --job tests/jobs/tiny.yaml
"""

from __future__ import annotations

import collections
import contextlib
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
from typing import IO, Iterator

from resnet18.runtime.errors import EXIT_FAILURE, EXIT_PORT_IN_USE, EXIT_RETRYABLE, EXIT_USAGE, SetupError
from resnet18.runtime.files import is_running

STOP_GRACE_SECONDS = 5  # SIGTERM -> SIGKILL for the survivors of a genuine failure (their group is broken)
POLL_SECONDS = 0.2
TAIL_LINES = 20
ALIVE_SECONDS = 1.0  # how often each task touches its liveness file
ALIVE_STALE_SECONDS = 10.0  # a liveness file older than this: the process is frozen
# A running task silent this long is stopped and blamed, whatever its peers do: TensorFlow notices a frozen
# peer in training, but one frozen before the group forms is waited for (registration) for up to an hour.
FROZEN_SECONDS = 60.0
RETRYABLE_EXIT_CODES = (EXIT_RETRYABLE, 130, 137, 143)  # Kubeflow's retryable set
PARENT_PID_VARIABLE = "LAUNCHER_PARENT_PID"  # tells a task to die with this launcher
ALIVE_FILE_VARIABLE = "LAUNCHER_ALIVE_FILE"  # tells a task which file to keep touching
WAITING_FOR_GROUP = "waiting for the group\n"  # what a task writes in that file while its group forms
EVALUATOR = "evaluator"


@dataclasses.dataclass(frozen=True)
class Slot:
    """One worker's place in the group, kept across restarts."""

    index: int  # its number when the job first started: its name and its log file
    gpus: str | None = None  # its CUDA_VISIBLE_DEVICES (None: the environment's)

    @property
    def name(self) -> str:
        return f"worker {self.index}"


@dataclasses.dataclass
class Task:
    """One running process of the group."""

    name: str  # "worker 0", "evaluator"
    process: subprocess.Popen
    tail: collections.deque
    log_path: str | None
    alive_path: str | None = None
    tf_config: str = ""
    gpus: str | None = None
    reader: threading.Thread | None = None
    ended: float | None = None  # when the process ended (time.time(), recorded by a waiter thread)
    last_output: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def code(self) -> int | None:
        return self.process.returncode if self.ended is not None else None

    def waiting_for_group(self) -> bool:
        """Whether the task said it is waiting for its group to form (see `waiting_for_group` below)."""
        try:
            with open(self.alive_path or "", encoding="utf-8") as stream:
                return stream.read(len(WAITING_FOR_GROUP)) == WAITING_FOR_GROUP
        except OSError:
            return False

    def frozen_for(self, now: float | None = None) -> float:
        """Seconds since the task last touched its liveness file (0 while it is fresh or unknown)."""
        if not self.alive_path:
            return 0.0
        try:
            return max(0.0, (time.time() if now is None else now) - os.stat(self.alive_path).st_mtime)
        except FileNotFoundError:
            return 0.0  # not started yet


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a group (or its evaluator) ended badly: the task to blame."""

    task: str
    exit_code: int
    last_lines: tuple[str, ...]
    log_path: str | None = None
    note: str = ""  # why this task is blamed when it is not the first that ended
    silent: tuple[tuple[str, float], ...] = ()  # (task, seconds since its last sign of life) when it was blamed

    @classmethod
    def of(cls, task: Task, note: str = "", silent: tuple[tuple[str, float], ...] = ()) -> Failure:
        code = task.process.returncode if task.process.returncode is not None else -signal.SIGKILL
        return cls(task.name, code, tuple(task.tail), task.log_path, note, silent)

    def describe(self) -> str:
        how = (f"was killed by {signal.Signals(-self.exit_code).name}" if self.exit_code < 0
               else f"exited with code {self.exit_code}")
        lines = "\n".join(f"    {line}" for line in self.last_lines) or "    (no output)"
        log = f" (full output: {self.log_path})" if self.log_path else ""
        note = f" ({self.note})" if self.note else ""
        return f"{self.task} {how}: {self.cause}{note}{log}; its last lines:\n{lines}"

    @property
    def error(self) -> str | None:
        """The task's own last `error: ...` line (what it said of its failure), if it said one."""
        said = [line.strip() for line in self.last_lines if line.strip().startswith("error:")]
        return said[-1].removeprefix("error:").strip() if said else None

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


def local_tf_configs(workers: int, ports: list[int], evaluator: bool = False) -> list[str]:
    """TF_CONFIG of each rank of a cluster on 127.0.0.1 (rank 0 is the chief), then the evaluator's."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports[:workers]]}
    if evaluator:  # listed in the cluster as Kubeflow does; it joins no collective
        cluster[EVALUATOR] = [f"127.0.0.1:{ports[workers]}"]
    configs = [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": rank}}) for rank in range(workers)]
    if evaluator:
        configs.append(json.dumps({"cluster": cluster, "task": {"type": EVALUATOR, "index": 0}}))
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
    if gpus_per_worker * workers > len(visible):  # as --gpus N with fewer GPUs: asking for absent GPUs is an error
        raise SetupError(f"--workers {workers} x --gpus_per_worker {gpus_per_worker} needs "
                         f"{workers * gpus_per_worker} GPUs; this host shows {len(visible)} (CUDA_VISIBLE_DEVICES, "
                         "else nvidia-smi -L)")
    return [",".join(visible[rank * gpus_per_worker:(rank + 1) * gpus_per_worker]) for rank in range(workers)]


def initial_slots(workers: int, gpus_per_worker: int | None = None) -> list[Slot]:
    """The slots of a group's first start: worker 0..N-1, each with its share of the visible GPUs."""
    return [Slot(rank, gpus) for rank, gpus in enumerate(gpu_slices(workers, gpus_per_worker, visible_gpu_ids()))]


# --- In a task: die with the launcher, keep the liveness file fresh ---------------------------

def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """In a task: get `signum` (SIGKILL) when the launcher dies, so no worker is orphaned (Linux).

    Called by the task itself at start-up rather than through Popen's preexec_fn, which
    is unsafe while the launcher runs threads (it may deadlock in the child).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signum)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the launcher died before the line above: nothing to serve
        os._exit(EXIT_RETRYABLE)


@contextlib.contextmanager
def waiting_for_group() -> Iterator[None]:
    """In a task: says, in its liveness file, that it waits for its group to form.

    TensorFlow holds the GIL while MultiWorkerMirroredStrategy waits for every task to register, so the
    touching thread stops and the file of a task that only waits for a frozen peer goes stale as well:
    the launcher blames a stale task that does not say this first.
    """
    path = os.environ.get(ALIVE_FILE_VARIABLE)
    if path:
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as stream:
            stream.write(WAITING_FOR_GROUP)
    try:
        yield
    finally:
        if path:
            with contextlib.suppress(OSError), open(path, "w", encoding="utf-8"):
                pass


def keep_alive(path: str) -> None:
    """In a task: touch `path` every ALIVE_SECONDS from a daemon thread, for as long as the process runs."""

    def touch() -> None:
        while True:
            try:
                with open(path, "a", encoding="utf-8"):
                    os.utime(path)
            except OSError:
                pass  # the launcher reads it; a missed touch is only a missed sign of life
            time.sleep(ALIVE_SECONDS)

    threading.Thread(target=touch, name="alive", daemon=True).start()


# --- Starting, stopping, blaming ---------------------------------------------------------

# The launcher's console: its own lines and its tasks' (written by one thread per task) go through this lock,
# each whole; print() writes a line and its end separately, and a task's line could land between the two.
_CONSOLE = threading.Lock()


def say(text: str, stream: IO[str] | None = None) -> None:
    """Writes one line to the console (stdout, or `stream`), never mixed with a task's line."""
    stream = stream or sys.stdout
    with _CONSOLE:
        stream.write(text + "\n")
        stream.flush()


def _stop_logging(log: IO[str], task: Task, error: OSError) -> None:
    with contextlib.suppress(OSError):
        log.close()
    say(f"warning: {task.name}'s log {task.log_path} cannot be written ({error.strerror}); its output goes to "
        "the console only", sys.stderr)


def _pump(task: Task, stream: IO[str], show: bool) -> None:
    """Copies a task's output to its log file and, if `show`, to the console with its name."""
    log = open(task.log_path, "a", encoding="utf-8") if task.log_path else None
    try:
        for line in iter(stream.readline, ""):
            task.last_output = time.monotonic()
            if log:
                try:
                    log.write(line)
                    log.flush()
                except OSError as error:  # a full or vanished disk: the output still reaches the console
                    _stop_logging(log, task, error)
                    log = None
            line = line.rstrip("\n")
            task.tail.append(line)
            if show:
                say(f"[{task.name}] {line}")
    finally:
        stream.close()
        if log:
            with contextlib.suppress(OSError):  # a full disk: what could be written was flushed line by line
                log.close()


def start_task(command: tuple[str, ...], name: str, tf_config: str, gpus: str | None, attempt: int,
               log_dir: str | None, show: bool) -> Task:
    """Starts one task of the group with its TF_CONFIG and GPUs; its output goes to its log (and the console)."""
    env = dict(os.environ, TF_CONFIG=tf_config, PYTHONUNBUFFERED="1", **{PARENT_PID_VARIABLE: str(os.getpid())})
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    log_path = alive_path = None
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, name.replace(" ", "-") + ".log")
        alive_path = env[ALIVE_FILE_VARIABLE] = os.path.join(log_dir, name.replace(" ", "-") + ".alive")
        with contextlib.suppress(OSError), open(log_path, "a", encoding="utf-8") as log:  # a full disk: no header
            log.write(f"===== attempt {attempt}, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"
                      f", TF_CONFIG {tf_config} =====\n")
        with contextlib.suppress(OSError), open(alive_path, "w", encoding="utf-8"):  # ages from now: a task frozen
            os.utime(alive_path)  # before its own touching starts is seen too (and says nothing of a group)
    process = subprocess.Popen(
        list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, bufsize=1, start_new_session=True)  # signals reach the tasks only through the launcher, once
    task = Task(name, process, collections.deque(maxlen=TAIL_LINES), log_path, alive_path, tf_config, gpus)
    task.reader = threading.Thread(target=_pump, args=(task, process.stdout, show), daemon=True)
    task.reader.start()

    def wait() -> None:  # the time a task ended decides which one failed first
        process.wait()
        task.ended = time.time()

    threading.Thread(target=wait, daemon=True).start()
    return task


def frozen_task(tasks: list[Task], now: float | None = None,
                limit: float = FROZEN_SECONDS) -> tuple[Task, float] | None:
    """A running task whose liveness file is older than `limit` seconds, and its age; None if none is."""
    now = time.time() if now is None else now
    running = [task for task in tasks if task.process.poll() is None]
    # One that only waits for its group (TensorFlow holds its GIL meanwhile) goes stale because of another,
    # which goes stale in turn if it is the frozen one; when every task waits, the group cannot form.
    suspects = [task for task in running if not task.waiting_for_group()] or running
    age, task = max(((task.frozen_for(now), task) for task in suspects), key=lambda pair: pair[0],
                    default=(0.0, None))
    return (task, age) if task is not None and age > limit else None


def stop_tasks(tasks: list[Task], grace: float = STOP_GRACE_SECONDS, signal_first: bool = True) -> None:
    """SIGTERM to every live task (unless `signal_first` is False), SIGKILL to those alive after `grace` s."""
    live = [task for task in tasks if task.process.poll() is None]
    if signal_first:
        for task in live:
            send_signal(task, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(task.process.poll() is None for task in live):
        time.sleep(POLL_SECONDS)
    for task in live:
        if task.process.poll() is None:
            send_signal(task, signal.SIGKILL)
    for task in tasks:
        task.process.wait()
        if task.reader:
            task.reader.join(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(task.ended is None for task in tasks):
        time.sleep(0.01)


def send_signal(task: Task, signum: int) -> None:
    try:
        task.process.send_signal(signum)
    except ProcessLookupError:
        pass


def first_failure(tasks: list[Task]) -> Task | None:
    """The task that failed first by the time it ended (not the first one noticed)."""
    failed = [task for task in tasks if task.code not in (None, 0)]
    return min(failed, key=lambda task: task.ended) if failed else None


def to_blame(tasks: list[Task], failed: Task, settle: bool = True) -> Failure:
    """The failure of a group, blamed on `failed` (the first task that ended) or on a frozen one.

    A worker that ended with 138 may have been stalled by a frozen peer (its watchdog fired, or it lost
    the peer's heartbeats): a still-running task whose liveness file went stale is the frozen one. The
    peer may give up before the frozen file is ALIVE_STALE_SECONDS old (TensorFlow's coordination
    service declares a task unhealthy after about as long), so with `settle` this waits, at most that
    long, until a running task's file is stale or every task has ended.
    """
    deadline = time.time() + (ALIVE_STALE_SECONDS + ALIVE_SECONDS if settle and failed.code == EXIT_RETRYABLE
                              else 0.0)
    while True:
        now = time.time()
        running = [task for task in tasks if task.ended is None and task is not failed]
        # A task still waiting for its group to form is stale because TensorFlow holds its GIL, not frozen.
        frozen = [(age, task) for task in running
                  if (age := task.frozen_for(now)) > ALIVE_STALE_SECONDS and not task.waiting_for_group()]
        if frozen or not running or now >= deadline:
            break
        time.sleep(ALIVE_SECONDS / 4)
    silent = tuple((task.name, round(task.frozen_for(now), 1)) for task in tasks)
    if failed.code != EXIT_RETRYABLE or not frozen:
        return Failure.of(failed, silent=silent)
    age, task = max(frozen, key=lambda pair: pair[0])
    return Failure.of(task, f"frozen: no sign of life for {age:.0f} s while {failed.name} gave up waiting", silent)


def stop_runs_in(workdirs: list[str], grace: float) -> dict[str, list[int]]:
    """Stops every `python -m launcher` of this host running in one of `workdirs`: SIGTERM (a preemption: it
    saves and exits 138), then SIGKILL to those still running after `grace` s. Returns the pids found in each
    directory that had any. A sweep calls it before resuming trials there: two runs in one directory would
    write the same checkpoints (such a run is left by a sweep process that died, and may still be saving)."""
    targets = {os.path.realpath(workdir): workdir for workdir in workdirs}
    found: dict[str, list[int]] = {}
    for pid, argv, cwd in _launcher_processes():
        if (workdir := targets.get(_workdir_of(argv, cwd))) is not None:
            found.setdefault(workdir, []).append(pid)
    pids = [pid for group in found.values() for pid in group]
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    for pid in pids:
        if is_running(pid):  # not one reaped meanwhile, whose number may be another process's by now
            _kill(pid, signal.SIGKILL)
    return found


def _launcher_processes() -> list[tuple[int, list[str], str]]:
    """(pid, argv, working directory) of every `python -m launcher` process of this host we may see."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as stream:
                argv = stream.read().decode(errors="replace").split("\0")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:  # gone meanwhile, or another user's
            continue
        if any(argv[index:index + 2] == ["-m", "launcher"] for index in range(len(argv))):
            found.append((int(entry), argv, cwd))
    return found


def _workdir_of(argv: list[str], cwd: str) -> str | None:
    if "--workdir" not in argv[:-1]:
        return None
    return os.path.realpath(os.path.join(cwd, argv[argv.index("--workdir") + 1]))


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)
