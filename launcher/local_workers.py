"""Local multi-worker launch: `python -m launcher --workers N` on one host (what torchrun is to PyTorch).

Starts N worker processes of the same job (and with --evaluator one sidecar
evaluator), each with a generated TF_CONFIG on free ports of 127.0.0.1, and
supervises them (the processes themselves: launcher/processes.py):

- Output: each task's complete output goes to WORKDIR/logs/<task>.log; the console
  shows the tasks `--log_workers` selects, prefixed `[worker i]`.
- Signals: SIGINT/SIGTERM are forwarded. During a preemption every worker gets
  `--preemption_grace` seconds (default 60) to finish its checkpoint.
- Failures: the task to blame is the first to fail *by time*, or a frozen one (its
  liveness file stale) that made the others give up. The others are stopped (SIGTERM,
  then SIGKILL after 5 s; after the grace period when the first exited 138, since then
  its peers are saving or leaving too; a peer still waiting for the group to form has
  nothing to save and is killed at once), and the report names the task, its exit code,
  its last lines and its log file.
- Restarts: after a retryable failure the whole group restarts from the latest
  checkpoint, up to `--max_restarts` times. A worker slot blamed on two starts in a row
  is dropped while more than `--min_workers` remain; every other slot keeps its name,
  its GPUs and its log file. The data order does not depend on the number of workers,
  so the job goes on at the same step with the same global batch.
- The evaluator is not part of training: its failure never stops or restarts the
  workers. It is restarted alone (it skips what it has evaluated), up to
  `--max_restarts` times; once the workers have finished, it is waited for as long as
  it shows signs of progress (a line of output within `evaluator_silence` seconds).
  A run whose training finished but whose evaluator failed exits with the evaluator's
  code and says so; running the same command again evaluates what is left.
- Ports: a port taken between the probe and TensorFlow's bind (the worker exits
  98) restarts the group on new ports at once, without counting as a restart.

    python -m launcher --workers 2 --job tests/jobs/tiny.yaml              # 2 CPU workers
    python -m launcher --workers 4 --min_workers 2 --max_restarts 3 --job JOB
    python -m launcher --workers 2 --evaluator --log_workers 0 --job JOB

Note: TensorFlow's gRPC server listens on every interface whatever address
TF_CONFIG names, and it is unauthenticated (TensorFlow's SECURITY.md); docs/security.md
says what that means here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from typing import Callable

from launcher.processes import (EVALUATOR, FROZEN_SECONDS, POLL_SECONDS, STOP_GRACE_SECONDS, Failure, Slot, Task,
                                first_failure, free_ports, frozen_task, initial_slots, local_tf_configs, say,
                                send_signal, start_task, stop_tasks, to_blame)
from resnet18.runtime.errors import EXIT_FAILURE, EXIT_PORT_IN_USE, EXIT_RETRYABLE, LauncherError, SetupError
from resnet18.runtime.status import append_events

DEFAULT_PREEMPTION_GRACE_SECONDS = 60  # a preempted worker's peers may still be writing their checkpoint
FINISH_GRACE_SECONDS = 120  # after one worker succeeds, the other workers must end within this
PORT_RETRIES = 5
SHRINK_AFTER = 2  # a worker slot blamed on this many starts in a row is dropped (elastic)
# Beyond train.step_timeout_seconds, the silence allowed to an evaluator once training is done: its first
# evaluation traces and compiles (training/evaluator.py's CHIEF_STARTUP_SECONDS, 600) and at the end it
# waits for the trainer's summary.json (SUMMARY_WAIT_SECONDS, 120).
EVALUATOR_ALLOWANCE_SECONDS = 720


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
    frozen_after: float = FROZEN_SECONDS  # a task whose liveness file is this old is stopped and blamed
    evaluator_silence: float | None = None  # once training is done: the evaluator's longest silence; None: any
    global_batch: int | None = None  # train.global_batch_size, to say what a shrink does to each replica's batch
    replicas_per_worker: int = 1
    command: tuple[str, ...] = (sys.executable, "-m", "launcher")
    check_workers: Callable[[int], None] = lambda count: None  # refuses a worker count (e.g. batch not divisible)


@dataclasses.dataclass
class Group:
    """A started group: its workers (in rank order) and its evaluator."""

    workers: list[Task]
    evaluator: Task | None = None
    evaluator_failure: Failure | None = None  # given up on: training went on without it
    forwarded: list[int] = dataclasses.field(default_factory=list)  # the signals passed on to it, in order

    @property
    def tasks(self) -> list[Task]:
        return self.workers + ([self.evaluator] if self.evaluator else [])


def start_group(spec: GroupSpec, slots: list[Slot], attempt: int) -> Group:
    """Starts one worker per slot, ranked in slot order (and the evaluator), on fresh ports."""
    ports = free_ports(len(slots) + int(spec.evaluator))
    configs = local_tf_configs(len(slots), ports, spec.evaluator)
    group = Group([])
    for rank, (slot, tf_config) in enumerate(zip(slots, configs)):
        group.workers.append(_start(spec, slot.name, tf_config, slot.gpus, attempt))
        where = f", CUDA_VISIBLE_DEVICES={slot.gpus!r}" if slot.gpus else ""
        _said(group.workers[-1], f"Started {slot.name} (pid {group.workers[-1].process.pid}, rank {rank}, "
                                 f"port {ports[rank]}{where}")
    if spec.evaluator:
        group.evaluator = _start(spec, EVALUATOR, configs[-1], "", attempt)
        _said(group.evaluator, f"Started evaluator (pid {group.evaluator.process.pid}, port {ports[-1]}")
    return group


def _start(spec: GroupSpec, name: str, tf_config: str, gpus: str | None, attempt: int) -> Task:
    show = spec.console is None or name in spec.console
    return start_task((*spec.command, *spec.worker_args), name, tf_config, gpus, attempt, spec.log_dir, show)


def _said(task: Task, text: str) -> None:
    say(text + (f", log {task.log_path}" if task.log_path else "") + ")")


def wait_for_group(spec: GroupSpec, group: Group, forwarded: list[int], attempts: Attempts) -> Failure | None:
    """Waits until the workers (and the evaluator) end; on a worker's failure stops all. Returns it, or None.

    SIGINT/SIGTERM received meanwhile are forwarded to the tasks and appended to `forwarded`.
    """

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        forwarded.append(signum)
        for task in group.tasks:
            if task.process.poll() is None:
                send_signal(task, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in forwarded:  # received while the group started
        for task in group.tasks:
            if task.process.poll() is None:
                send_signal(task, signum)
    try:
        finish_deadline = None
        while True:
            failed = first_failure(group.workers)
            if failed is not None:
                return _stop_failed_group(spec, group, failed, forwarded)
            if (frozen := frozen_task(group.workers, limit=spec.frozen_after)) is not None:
                task, age = frozen
                stop_tasks(group.tasks)  # SIGKILL after the grace ends a stopped process too
                return dataclasses.replace(Failure.of(task), note=f"no sign of life for {age:.0f} s: frozen")
            if group.evaluator is not None and group.evaluator.code is not None:
                _after_evaluator_ended(spec, group, attempts, forwarded)
            codes = [task.code for task in group.workers]
            if all(code == 0 for code in codes):
                if group.evaluator is None:
                    return None
                _check_evaluator_progress(spec, group)
            elif finish_deadline is None and any(code == 0 for code in codes):
                finish_deadline = time.monotonic() + FINISH_GRACE_SECONDS
            elif finish_deadline is not None and time.monotonic() > finish_deadline:
                straggler = next(task for task in group.workers if task.code is None)
                stop_tasks(group.tasks)
                return dataclasses.replace(Failure.of(straggler), note=f"still running {FINISH_GRACE_SECONDS} s "
                                                                       "after another worker finished")
            time.sleep(POLL_SECONDS)
    finally:
        group.forwarded = list(forwarded)  # before the handler goes: a later signal was not passed on
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_failed_group(spec: GroupSpec, group: Group, failed: Task, forwarded: list[int]) -> Failure:
    """Stops every task after a worker failed; returns the failure, blamed on the right worker."""
    # Before the stop, which makes every liveness file stale; a preemption's 138s blame nobody frozen.
    blamed = to_blame(group.workers, failed, settle=not forwarded)
    # Preempted (forwarded signal or 138): the others are saving; otherwise the group is broken.
    patient = bool(forwarded) or failed.code == EXIT_RETRYABLE
    if patient:
        _kill_those_waiting_for_the_group(group)
        if group.evaluator is not None and group.evaluator.code is None and not forwarded:
            send_signal(group.evaluator, signal.SIGTERM)  # not training: nothing to save; stops it at once
    stop_tasks(group.tasks, spec.preemption_grace if patient else STOP_GRACE_SECONDS, signal_first=not patient)
    if blamed.task == failed.name:  # a task that ended meanwhile may have failed earlier
        blamed = dataclasses.replace(Failure.of(first_failure(group.workers)), silent=blamed.silent)
    else:  # the frozen task is gone now (killed): its code is the kill's
        blamed = dataclasses.replace(blamed, exit_code=next(
            task.process.returncode for task in group.workers if task.name == blamed.task))
    return blamed


def _kill_those_waiting_for_the_group(group: Group) -> None:
    """SIGKILL now to each task still waiting for its group to form: the group cannot form without the
    task that ended, the waiting one has nothing to save, and TensorFlow holds its GIL in that wait, so
    its SIGTERM handler would not run before the preemption grace ran out."""
    for task in group.tasks:
        if task.process.poll() is None and task.waiting_for_group():
            send_signal(task, signal.SIGKILL)


def _after_evaluator_ended(spec: GroupSpec, group: Group, attempts: Attempts, forwarded: list[int]) -> None:
    """The evaluator ended: done, restarted alone, or given up on (training goes on either way)."""
    evaluator = group.evaluator
    if evaluator.code == 0:
        group.evaluator = None
        group.evaluator_failure = None
        return
    failure = Failure.of(evaluator)
    _event(spec, {"event": "evaluator_failed", "exit_code": failure.exit_code, "cause": failure.cause,
                  "log": failure.log_path})
    if not forwarded and failure.retryable and attempts.evaluator_restarts < spec.max_restarts:
        attempts.evaluator_restarts += 1
        print(f"warning: {failure.describe()}", file=sys.stderr, flush=True)
        group.evaluator = _start(spec, EVALUATOR, evaluator.tf_config, "", attempts.current)
        _said(group.evaluator, f"Restarted evaluator (pid {group.evaluator.process.pid}, restart "
                               f"{attempts.evaluator_restarts}/{spec.max_restarts}")
        return
    group.evaluator, group.evaluator_failure = None, failure
    print(f"warning: the evaluator is gone, training goes on without it: {failure.describe()}", file=sys.stderr,
          flush=True)


def _check_evaluator_progress(spec: GroupSpec, group: Group) -> None:
    """Training is done: the evaluator may take as long as it needs while it shows signs of progress."""
    evaluator = group.evaluator
    silent = time.monotonic() - evaluator.last_output
    if spec.evaluator_silence is None or silent <= spec.evaluator_silence:
        return
    stop_tasks([evaluator])
    group.evaluator = None
    group.evaluator_failure = dataclasses.replace(
        Failure.of(evaluator), note=f"no output for {silent:.0f} s after training finished")


# --- The launch loop: restarts, elastic shrinking, ports ----------------------------------

@dataclasses.dataclass
class Attempts:
    """What the launch loop remembers across starts of the group."""

    slots: list[Slot]
    restarts: int = 0
    port_retries: int = 0
    blamed: list[str] = dataclasses.field(default_factory=list)  # per start, the task blamed for its failure
    evaluator_restarts: int = 0  # alone, in the whole run (each start of the group starts the evaluator too)

    @property
    def current(self) -> int:
        """The number of the current start of the group, from 0 (restarts and port retries before it)."""
        return self.restarts + self.port_retries


def launch(spec: GroupSpec) -> int:
    """Runs a local multi-worker job to the end; returns the launcher's exit code.

    A SIGINT/SIGTERM to the launcher itself is never retried.
    """
    if spec.workers < 1:
        raise SetupError(f"--workers must be >= 1, got {spec.workers}")
    if os.environ.get("TF_CONFIG", "").strip():
        raise SetupError("--workers starts its own local cluster; unset TF_CONFIG (it is set by cluster systems)")
    attempts = Attempts(initial_slots(spec.workers, spec.gpus_per_worker))
    # A signal while no group runs (as one starts, between two starts) is kept: passed on once the group has
    # started, or it ends the launch before the next start. Never the default action, which would leave
    # workers without their supervisor or exit 143 instead of 138.
    kept: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: kept.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            if kept:
                print(f"error: stopped by {signal.Signals(kept[0]).name} before the group started again",
                      file=sys.stderr, flush=True)
                return EXIT_RETRYABLE if kept[0] == signal.SIGTERM else 128 + kept[0]  # nothing to save
            outcome = _start_and_wait(spec, attempts, kept)
            if outcome is not None:
                return outcome
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start_and_wait(spec: GroupSpec, attempts: Attempts, kept: list[int]) -> int | None:
    """Starts the group once and waits for it: None to start again, or the launcher's exit code.

    `kept`: the signals received so far, passed on to the group once it has started."""
    attempt = attempts.current
    workers = len(attempts.slots)
    say(f"Starting {workers} local worker(s){' and an evaluator' if spec.evaluator else ''} on 127.0.0.1"
        + (f" (restart {attempts.restarts}/{spec.max_restarts})" if attempts.restarts else ""))
    _event(spec, {"event": "group_start", "attempt": attempt, "workers": workers, "evaluator": spec.evaluator,
                  "slots": [slot.name for slot in attempts.slots]})
    group = start_group(spec, attempts.slots, attempt)
    failure = wait_for_group(spec, group, kept, attempts)
    forwarded = group.forwarded  # not `kept`: one received since the group stopped ends the launch next
    if failure is None:
        return _finished(spec, group, workers)
    _event(spec, {"event": "group_failed", "task": failure.task, "exit_code": failure.exit_code,
                  "cause": f"{failure.task} {failure.cause}" + (f" ({failure.note})" if failure.note else ""),
                  "error": failure.error, "log": failure.log_path,
                  "forwarded_signal": forwarded[0] if forwarded else None,
                  "seconds_since_sign_of_life": dict(failure.silent)})
    if forwarded:
        print(f"error: stopped by {signal.Signals(forwarded[0]).name}; {failure.describe()}",
              file=sys.stderr, flush=True)
        # A worker the forwarded SIGTERM killed by its default action had no handler yet: it was starting
        # and had nothing to save, so that is a preemption too.
        preempted = failure.exit_code == EXIT_RETRYABLE or failure.exit_code == -forwarded[0] == -signal.SIGTERM
        return EXIT_RETRYABLE if preempted else 128 + forwarded[0]
    return _after_failure(spec, attempts, failure)


def _finished(spec: GroupSpec, group: Group, workers: int) -> int:
    """Training finished on every worker: 0, or the evaluator's failure if it could not finish."""
    failure = group.evaluator_failure
    code = 0 if failure is None else failure.exit_code if failure.exit_code > 0 else EXIT_RETRYABLE
    _event(spec, {"event": "group_done", "workers": workers, "exit_code": code,
                  **({"evaluator_failed": failure.describe()} if failure else {})})
    say(f"All {workers} worker(s) finished")
    if failure is not None:
        print(f"error: training finished, but the evaluator did not: {failure.describe()}\nRun the same command "
              "again to evaluate the epochs it left (training is complete and will not repeat)", file=sys.stderr,
              flush=True)
    return code


def _after_failure(spec: GroupSpec, attempts: Attempts, failure: Failure) -> int | None:
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
    attempts.blamed.append(failure.task)
    print(f"warning: {failure.describe()}", file=sys.stderr, flush=True)
    _maybe_shrink(spec, attempts)
    print(f"Restarting the group from the latest checkpoint ({attempts.restarts}/{spec.max_restarts})",
          file=sys.stderr, flush=True)
    return None


def _maybe_shrink(spec: GroupSpec, attempts: Attempts) -> None:
    """Drops the worker slot blamed on the last SHRINK_AFTER starts, down to --min_workers; the others stay."""
    recent = attempts.blamed[-SHRINK_AFTER:]
    minimum = spec.min_workers or spec.workers
    slot = next((slot for slot in attempts.slots if slot.name == recent[0]), None) if recent else None
    if len(recent) < SHRINK_AFTER or len(set(recent)) != 1 or slot is None or len(attempts.slots) <= minimum:
        return
    try:
        spec.check_workers(len(attempts.slots) - 1)
    except LauncherError as error:
        print(f"warning: cannot continue on {len(attempts.slots) - 1} worker(s): {error}", file=sys.stderr,
              flush=True)
        return
    attempts.slots = [other for other in attempts.slots if other is not slot]
    attempts.blamed.clear()
    kept = ", ".join(other.name for other in attempts.slots)
    grows = ""
    if spec.global_batch:
        before, after = (spec.global_batch // (count * spec.replicas_per_worker)
                         for count in (len(attempts.slots) + 1, len(attempts.slots)))
        grows = (f"; each replica's batch grows from {before} to {after}: if that does not fit in memory, the next "
                 "start fails with exit 1 (out of memory), which is not retried")
    _event(spec, {"event": "group_shrink", "workers": len(attempts.slots), "dropped": slot.name,
                  "dropped_gpus": slot.gpus, "slots": [other.name for other in attempts.slots]})
    print(f"warning: {slot.name} failed first on {SHRINK_AFTER} starts in a row: continuing on "
          f"{len(attempts.slots)} worker(s) ({kept}; --min_workers {minimum}), same global batch, from the latest "
          f"checkpoint{grows}", file=sys.stderr, flush=True)


def _event(spec: GroupSpec, event: dict) -> None:
    """Adds the event to WORKDIR/events.jsonl, after any an earlier start could not record.

    A work directory that cannot take it (its disk full, say: the very failure to record) never stops the
    group: the event waits in this machine's temporary directory (a local group runs on one machine) for the
    next start of the same work directory, which records it in its place."""
    if not spec.workdir:
        return
    waiting = _unrecorded_file(spec.workdir)
    events = [*_read_unrecorded(waiting), {"time": time.time(), **event}]
    try:
        append_events(spec.workdir, events)
    except OSError as error:
        print(f"warning: could not record {event['event']} in {spec.workdir}/events.jsonl ({error.strerror}); "
              f"kept in {waiting} for the next start to record", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError), open(waiting, "w", encoding="utf-8") as stream:
            stream.write("".join(json.dumps(item) + "\n" for item in events))
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(waiting)


def _unrecorded_file(workdir: str) -> str:
    name = hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"launcher-unrecorded-events-{name}.jsonl")


def _read_unrecorded(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as stream:
            return [json.loads(line) for line in stream if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []
