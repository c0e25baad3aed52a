"""A chaos soak: faults drawn from a seed, at moments nobody chose, through one whole `--workers 2` run.

The run is the tiny job (3 epochs of 20 steps, a checkpoint every 4 steps, deterministic) under `--max_restarts`,
its work directory on a small file system of its own (a tmpfs). Faults, each at a random moment (a
random delay after the last fault, landing in start-up, restore or training, or just after a checkpoint
line, landing in or near a save):

- kill_worker     SIGKILL of a random worker: the group restarts from the latest checkpoint.
- term_worker     SIGTERM to one worker (its own preemption notice): the group agrees on a step, saves,
                  exits 138 and restarts.
- term_launcher   SIGTERM to the launcher: forwarded, the group saves and the launcher exits 138 (never
                  retried by itself); the soak starts the same command again, as a cluster would.
- lost_machine    SIGKILL of every process of the run, then the newest checkpoint truncated: the next
                  start falls back to the one before.
- disk_full       the work directory's file system filled up: exit 2 (permanent: not retried); the soak
                  frees the space, as an operator would, and starts the same command again.
- freeze_worker   SIGSTOP of a worker until the group notices and restarts (long soak only: detection
                  takes up to a minute).

It passes when the last run ends with the uninterrupted run's weights bit for bit, history.jsonl holds
every epoch exactly once, events.jsonl and `launcher.status` name every fault, and nothing permanent
was retried. It ends when training ends: faults still due then are counted as outlived. The seed is
printed; replay one with LAUNCHER_SOAK_SEED=S (the moments depend on timing, so a replay draws the same
faults, not always the same moments). The suite runs one short soak
(3 faults of 3 kinds); the long one is for release checks:

    LAUNCHER_SOAK_RUNS=10 LAUNCHER_SOAK_FAULTS=8 python -m pytest tests/test_soak.py -k long -s
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import time

import pytest

from launcher.status import collect
from tests.conftest import TINY_JOB, fill_up, run_launcher, small_tmpfs
from tests.processes import Running

pytestmark = pytest.mark.slow

FINGERPRINT = re.compile(r"Final weights sha256 ([0-9a-f]{64})")
SHORT_KINDS = ("kill_worker", "term_worker", "term_launcher", "lost_machine", "disk_full")
LONG_KINDS = (*SHORT_KINDS, "freeze_worker")
ENDS_THE_LAUNCHER = ("term_launcher", "lost_machine", "disk_full")


def job_args(data_dir: str, workdir) -> list[str]:
    return ["--job", TINY_JOB, "--workdir", str(workdir), "--set", f"data.data_dir={data_dir}", "train.epochs=3",
            "train.global_batch_size=32", "train.checkpoint_every_steps=4", "train.steps_per_loop=2",
            "train.deterministic=true"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_dir, tmp_path_factory) -> str:
    """The weights of the same 2-worker run without faults: those of two replicas in one process, which
    train bit for bit what two workers do (tests/test_multi_worker.py), in one TensorFlow process, not two."""
    result = run_launcher("--cpu_replicas", "2", *job_args(tiny_data_dir, tmp_path_factory.mktemp("soak_reference")))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (weights,) = FINGERPRINT.findall(result.stdout)
    return weights


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB tmpfs for the work directory (the soak fills it up)."""
    with small_tmpfs(tmp_path / "disk", 48) as mount_point:
        yield mount_point


@dataclasses.dataclass
class Soak:
    """One soak: the plan drawn from the seed, the faults applied, the launcher's runs."""

    seed: int
    args: list[str]
    disk: object
    plan: list[str]
    rng: random.Random
    applied: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (kind, what was done)
    when: list[float] = dataclasses.field(default_factory=list)  # time.time() of each
    outputs: list[str] = dataclasses.field(default_factory=list)
    codes: list[int] = dataclasses.field(default_factory=list)
    outlived: list[str] = dataclasses.field(default_factory=list)  # planned faults still due when training ended

    @property
    def filler(self):
        return self.disk / "filler"

    def run(self, max_runs: int = 12) -> str:
        """Runs the command until it exits 0, applying the plan's faults on the way; the last run's output."""
        pending = list(self.plan)
        while len(self.codes) < max_runs:
            run = Running(["--workers", "2", "--max_restarts", "20", *self.args])
            while pending and run.process.poll() is None:
                kind = pending[0]
                if not self.moment(run):
                    break
                what = self.apply(kind, run)
                if what is None:
                    continue  # nothing to apply it to right now: at another moment
                pending.pop(0)
                self.applied.append((kind, what))
                self.when.append(time.time())
                print(f"soak {self.seed}: {kind}: {what}", flush=True)
                if kind in ENDS_THE_LAUNCHER:
                    break
                self.reacted(run)
            code = run.finish(timeout=600)
            self.codes.append(code)
            self.outputs.append(run.output)
            if os.environ.get("LAUNCHER_SOAK_LOG"):
                with open(os.environ["LAUNCHER_SOAK_LOG"], "a", encoding="utf-8") as stream:
                    stream.write(f"===== seed {self.seed} run {len(self.codes)} exit {code} applied {self.applied}\n"
                                 + run.output + "\n")
            if self.filler.exists():
                self.filler.unlink()  # the operator frees the space
            if code == 0:  # training has ended: the soak ends with it, as the faults the run outlived
                self.outlived = pending
                return run.output
            assert code in (0, 2, 138, -signal.SIGKILL), f"seed {self.seed}: exit {code}\n" + run.output[-4000:]
        raise AssertionError(f"seed {self.seed}: not done after {max_runs} runs (exits {self.codes})")

    def moment(self, run: Running) -> bool:
        """Waits for a random moment of this run; False if it ended first."""
        if self.rng.random() < 0.5:
            return self._sleep(run, self.rng.uniform(0.0, 6.0))
        start = len(run.lines)
        deadline = time.monotonic() + 120
        while not any(re.search(r"Checkpoint at step \d+:", line) for line in run.lines[start:]):
            if run.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return self._sleep(run, self.rng.uniform(0.0, 0.3))

    @staticmethod
    def _sleep(run: Running, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if run.process.poll() is not None:
                return False
            time.sleep(0.01)
        return run.process.poll() is None

    def apply(self, kind: str, run: Running) -> str | None:
        """Applies one fault; what was done, or None if there was nothing to apply it to."""
        workers = latest_workers(run)
        if kind in ("kill_worker", "term_worker", "freeze_worker"):
            if not workers:
                return None
            rank = self.rng.choice(sorted(workers))
            sent = {"kill_worker": signal.SIGKILL, "term_worker": signal.SIGTERM,
                    "freeze_worker": signal.SIGSTOP}[kind]
            if not signal_pid(workers[rank], sent):
                return None
            return f"{sent.name} to worker {rank} (pid {workers[rank]})"
        if kind == "term_launcher":
            if not workers:
                return None  # before its group starts, a launcher has nothing to forward or save
            run.process.send_signal(signal.SIGTERM)
            return f"SIGTERM to the launcher (pid {run.process.pid})"
        if kind == "lost_machine":
            for pid in [run.process.pid, *descendants(run.process.pid)]:
                signal_pid(pid, signal.SIGKILL)
            run.finish(timeout=60)
            time.sleep(0.5)  # the killed workers' own children (none expected) and file handles go
            damaged = truncate_newest_checkpoint(self.disk / "run" / "checkpoints")
            return "SIGKILL to every process of the run" + (f"; {damaged} truncated" if damaged else "")
        if kind == "disk_full":
            fill_up(self.filler)
            return f"{self.disk} filled up"
        raise ValueError(kind)

    def reacted(self, run: Running) -> None:
        """Waits until the launcher has restarted the group (or ended): one fault at a time."""
        starts = sum("Starting 2 local worker(s)" in line for line in run.lines)
        frozen = [pid for pid in latest_workers(run).values() if process_state(pid) == "T"]
        deadline = time.monotonic() + 240
        while (sum("Starting 2 local worker(s)" in line for line in run.lines) == starts
               and run.process.poll() is None):
            assert time.monotonic() < deadline, f"seed {self.seed}: no restart after {self.applied[-1]}\n" \
                + run.output[-3000:]
            time.sleep(0.05)
        for pid in frozen:  # a frozen worker the launcher has given up on is killed by it; never leave one
            signal_pid(pid, signal.SIGCONT)


def latest_workers(run: Running) -> dict[int, int]:
    """Rank -> pid of the workers of the group's latest start."""
    start = max((i for i, line in enumerate(run.lines) if "Starting 2 local worker(s)" in line), default=0)
    found = {}
    for line in run.lines[start:]:
        match = re.search(r"Started worker (\d+) \(pid (\d+)", line)
        if match:
            found[int(match.group(1))] = int(match.group(2))
    return found


def signal_pid(pid: int, sent: signal.Signals) -> bool:
    try:
        os.kill(pid, sent)
        return True
    except ProcessLookupError:
        return False


def process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the launcher, unshare, the supervisor inside, the workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as stream:
                    parent = int(stream.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def truncate_newest_checkpoint(directory) -> str | None:
    """Truncates the newest checkpoint's data, as a lost machine's unfinished write may; not the only one: with
    none readable, the run refuses to start over (exit 2, by design)."""
    data = sorted(directory.glob("ckpt-*.data-*"), key=lambda path: int(path.name.split("-")[1].split(".")[0]))
    if len(data) < 2:
        return None
    newest = data[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    return newest.name.split(".")[0]


def events(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines() if line.strip()]


def tells(kind: str, what: str, event: dict) -> bool:
    """Whether `event` is the launcher's account of the fault."""
    failed = event["event"] == "group_failed"
    if kind == "kill_worker":
        return failed and event["exit_code"] == -signal.SIGKILL
    if kind == "term_worker":  # 138 once its handler is set; killed by the signal during its first imports
        return failed and event["exit_code"] in (138, -signal.SIGTERM) and not event["forwarded_signal"]
    if kind == "term_launcher":
        return failed and event["forwarded_signal"] == signal.SIGTERM
    if kind == "freeze_worker":
        return failed and event["task"] == re.search(r"worker \d", what).group(0)
    if kind == "disk_full":
        return failed and event["exit_code"] == 2 and "no space left" in json.dumps(event)
    if kind == "lost_machine":  # nobody is left to say so; the next start says what it could not read
        damaged = re.search(r"(ckpt-\d+) truncated", what)
        return event["event"] == "train_start" and (not damaged or any(
            line.startswith(f"{damaged.group(1)} is unreadable") for line in event.get("skipped_checkpoints", [])))
    raise ValueError(kind)


def check_story(soak: Soak, workdir) -> None:
    """events.jsonl names every fault, in order; no permanent failure was followed by a restart."""
    story = events(workdir)
    position = 0
    for (kind, what), when in zip(soak.applied, soak.when):
        found = next((index for index in range(position, len(story)) if tells(kind, what, story[index])), None)
        if found is None and kind == "term_worker" and (any(
                event["event"] == "train_end" and event["state"] == "done" and event["time"] <= when
                for event in story[position:]) or re.search(
                    r"worker \d\] SIGTERM during or after the last training step", "\n".join(soak.outputs))):
            continue  # it landed in or after the last training call: the worker finishes and exits 0, as it should
        assert found is not None, (f"seed {soak.seed}: {kind} ({what}) is not in events.jsonl after event "
                                   f"{position}:\n" + "\n".join(json.dumps(event) for event in story))
        if kind == "lost_machine":
            # Told by the first start that reads the checkpoints, which a later fault (a disk full before the
            # restore) can precede: the next fault's account is looked for from the run it hit on.
            found = next(index for index in range(position, len(story)) if story[index]["event"] == "group_start")
        position = found + 1
    for index, event in enumerate(story):  # exit 1 or 2 is permanent: the launcher's next start is a new run's
        if event["event"] == "group_failed" and event["exit_code"] in (1, 2):
            following = [later for later in story[index + 1:] if later["event"] == "group_start"]
            assert not following or following[0]["attempt"] == 0, f"seed {soak.seed}: {event} was retried"


def soak_once(seed: int, faults: int, kinds: tuple[str, ...], data_dir: str, disk, reference: str) -> Soak:
    rng = random.Random(seed)
    plan = rng.sample(kinds, min(3, len(kinds)))  # at least three kinds
    plan += [rng.choice(kinds) for _ in range(faults - len(plan))]
    rng.shuffle(plan)
    print(f"soak seed {seed}: {', '.join(plan)} (replay: LAUNCHER_SOAK_SEED={seed})", flush=True)
    workdir = disk / "run"
    soak = Soak(seed, job_args(data_dir, workdir), disk, plan, rng)
    output = soak.run()
    # Both workers' fingerprints, the uninterrupted run's; more than two when a worker was killed after it said
    # its own (the group restarts and finds training complete).
    fingerprints = FINGERPRINT.findall(output)
    assert len(fingerprints) >= 2 and set(fingerprints) == {reference}, \
        f"seed {seed}: {soak.applied}\n" + output[-3000:]
    history = [json.loads(line)["epoch"] for line in (workdir / "history.jsonl").read_text().splitlines()]
    assert history == [1, 2, 3], f"seed {seed}: history epochs {history}"
    check_story(soak, workdir)
    status = collect(str(workdir))  # what `python -m launcher.status` shows
    assert status["state"] == "finished" and status["final"]["steps"] == 60, status
    starts = sum(event["event"] == "group_start" for event in events(workdir))  # each, the chief trained or not
    unknown = [restart for restart in status["restarts"] if restart["cause"].startswith("unknown")]
    assert len(status["restarts"]) == starts - 1, status["restarts"]
    assert len(unknown) <= sum(kind == "lost_machine" for kind, _ in soak.applied), status["restarts"]
    return soak


def seeds(count: int) -> list[int]:
    given = os.environ.get("LAUNCHER_SOAK_SEED")
    return [int(given)] if given else [random.SystemRandom().randrange(10**6) for _ in range(count)]


def test_a_short_soak_of_three_kinds_of_fault_ends_with_the_uninterrupted_weights(tiny_data_dir, small_disk,
                                                                                  uninterrupted):
    (seed,) = seeds(1)
    soak = soak_once(seed, 3, SHORT_KINDS, tiny_data_dir, small_disk, uninterrupted)
    assert len({kind for kind, _ in soak.applied}) == 3


@pytest.mark.skipif(not os.environ.get("LAUNCHER_SOAK_RUNS"), reason="the long soak is for release checks: "
                    "LAUNCHER_SOAK_RUNS=N (and LAUNCHER_SOAK_FAULTS=F) runs it")
@pytest.mark.timeout(0)  # N runs of minutes each; every wait inside a run has its own deadline
def test_a_long_soak(tiny_data_dir, small_disk, uninterrupted):
    faults = int(os.environ.get("LAUNCHER_SOAK_FAULTS", "8"))
    counts: dict[str, int] = {}
    outlived = 0
    for seed in seeds(int(os.environ["LAUNCHER_SOAK_RUNS"])):
        shutil.rmtree(small_disk / "run", ignore_errors=True)  # each seed's run from scratch
        soak = soak_once(seed, faults, LONG_KINDS, tiny_data_dir, small_disk, uninterrupted)
        for kind, _ in soak.applied:
            counts[kind] = counts.get(kind, 0) + 1
        outlived += len(soak.outlived)
    print(f"long soak: {counts}; {outlived} planned faults outlived by the end of training", flush=True)
