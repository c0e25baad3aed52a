"""Time to accuracy: how many seconds of training a job needs to reach a test accuracy.

    python -m benchmarks.time_to_accuracy --runs 5 --json time_to_accuracy_h200.json   # jobs/cifar10_fast.yaml, 94 %
    python -m benchmarks.time_to_accuracy --job tests/jobs/tiny.yaml --runs 2 --target 0.15 \\
        --set train.epochs=2 model.width=4                                              # tiny, ~30 s on 2 CPU cores

Runs the job --runs times, each as its own `python -m launcher` process in a fresh work
directory (WORKDIR_ROOT/run_1, run_2, ...; WORKDIR_ROOT defaults to a new temporary
directory), passing --set and --gpus through and streaming each run's output. Then it
reads every run's history.jsonl and summary.json and records, per run, the test
accuracy after each epoch, the first epoch at or above --target, and the seconds it
took; across runs, the mean / min / max final accuracy, how many runs reached the
target and their mean training seconds to it; and the environment (host, devices,
precision, TensorFlow version, UTC date, exact command lines). Writes --json (default
WORKDIR_ROOT/time_to_accuracy.json) and prints a table.

Two clocks, both from the launcher's history.jsonl:
  train_seconds    seconds inside training-step calls since step 0, the first call's
                   compilation included, evaluation excluded; the figure a target such as
                   "94 % in 60 s" is stated in.
  elapsed_seconds  wall seconds since train_and_evaluate started (data preparation,
                   evaluation, checkpoints included; process start-up and imports not).
The whole subprocess, imports included, is timed separately (wall_seconds per run).

NOT MEASURED YET: the H200 target (94 % test accuracy within 60 s of training time, one
GPU, jobs/cifar10_fast.yaml, as stated in the project's issue). No GPU run has been
recorded; the tiny CPU command above only checks that the benchmark works.

Offline machines: CIFAR-10 cannot be downloaded there. Carry cifar-10-binary.tar.gz
(https://www.cs.toronto.edu/~kriz/cifar.html) to a folder and add
`--set data.manual_dir=/folder/holding/it`; the launcher prepares the data set from it
(checksum checked) in the first run, into the TFDS data_dir (data.data_dir, default
~/tensorflow_datasets), and later runs reuse it. Preparation counts in that run's
elapsed_seconds and wall_seconds, never in train_seconds.

Exit codes: 0 every run finished (whether or not it reached the target: this is a
measurement, not a test); 2 bad arguments (e.g. --runs < 1, missing job file, unknown
config key); otherwise the exit code of the first run that failed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from launcher.cluster import environment_without_cluster
from resnet18.runtime.history import read_history
from resnet18 import config as config_lib
from resnet18.runtime.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JOB = os.path.join("jobs", "cifar10_fast.yaml")
EXIT_USAGE = 2
TAIL_LINES = 30  # lines of a failed run's output repeated in the error message


class UsageError(Exception):
    """A bad argument: reported in one line, exit code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=DEFAULT_JOB,
                        help=f"launcher job file (default: {DEFAULT_JOB}, relative to the repository if not here)")
    parser.add_argument("--runs", type=int, default=1, help="independent runs, each in a fresh work directory")
    parser.add_argument("--target", type=float, default=0.94,
                        help="test accuracy to reach, as a fraction (0.94 = 94 %%)")
    parser.add_argument("--workdir_root",
                        help="parent of the runs' work directories (default: a new temporary directory)")
    parser.add_argument("--json", help="write the results here (default: WORKDIR_ROOT/time_to_accuracy.json)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="passed to the launcher, e.g. --set data.manual_dir=/data train.epochs=10")
    parser.add_argument("--gpus", type=int, help="passed to the launcher: GPUs of this machine to use")
    return parser.parse_args(argv)


def resolve_job(job: str) -> str:
    """The job file as an absolute path: as given, else relative to the repository."""
    for candidate in (job, os.path.join(REPO, job)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    places = " and ".join(dict.fromkeys([os.getcwd(), REPO]))
    raise UsageError(f"job file {job!r} does not exist (looked in {places})")


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be wrong before the first run starts, so a bad flag costs no training."""
    if args.runs < 1:
        raise UsageError(f"--runs must be >= 1, got {args.runs}")
    if not 0.0 < args.target <= 1.0:
        raise UsageError(f"--target is a fraction of the test set in (0, 1], got {args.target}")
    if args.gpus is not None and args.gpus < 0:
        raise UsageError(f"--gpus must be >= 0, got {args.gpus}")
    args.job = resolve_job(args.job)
    flags = {"runtime.gpus": args.gpus} if args.gpus is not None else {}
    try:  # the launcher's own validation: unknown keys and bad values fail here, not N times later
        config_lib.build_config(args.job, args.overrides, flags)
    except ConfigError as error:
        raise UsageError(str(error)) from None
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UsageError(f"--json {args.json!r}: the directory {os.path.dirname(os.path.abspath(args.json))!r} "
                         "does not exist")
    if args.workdir_root:
        args.workdir_root = os.path.abspath(args.workdir_root)
        for index in range(1, args.runs + 1):
            workdir = run_workdir(args.workdir_root, index)
            # A used work directory would make the launcher resume from its checkpoint, not start fresh.
            if os.path.exists(workdir) and os.listdir(workdir):
                raise UsageError(f"{workdir} is not empty; every run needs a fresh work directory "
                                 "(choose another --workdir_root)")


def run_workdir(root: str, index: int) -> str:
    return os.path.join(root, f"run_{index}")


def launcher_command(args: argparse.Namespace, workdir: str) -> list[str]:
    command = [sys.executable, "-m", "launcher", "--job", args.job, "--workdir", workdir]
    if args.gpus is not None:
        command += ["--gpus", str(args.gpus)]
    if args.overrides:
        command += ["--set", *args.overrides]
    return command


def launcher_env() -> dict[str, str]:
    """This environment, minus TF_CONFIG (a run is one machine), with this checkout importable first."""
    env = environment_without_cluster()
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"  # stream the child's lines as they come
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_launcher(command: list[str], label: str) -> tuple[int, float, list[str]]:
    """Runs one launcher process, streaming its output prefixed with `label`.

    Returns (exit code, wall seconds of the whole process, its last lines). The child
    runs in this directory so relative paths in --set mean what they mean here.
    """
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", bufsize=1)
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            print(f"[{label}] {line}", flush=True)
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()  # SIGTERM: the launcher saves a checkpoint and exits 138
        process.wait()
        raise
    seconds = time.perf_counter() - started
    if code < 0:  # killed by a signal: report it the way a shell would
        code = 128 - code
    return code, seconds, list(tail)


def read_run(workdir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(history.jsonl entries, summary.json) of a finished run."""
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(summary_path):
        raise RuntimeError(f"the launcher exited 0 but wrote no {summary_path}")
    with open(summary_path, encoding="utf-8") as stream:
        summary = json.load(stream)
    return read_history(workdir), summary


def first_epoch_reaching(epochs: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first per-epoch entry whose test accuracy is at or above `target`, or None."""
    return next((entry for entry in epochs if entry["test_accuracy"] >= target), None)


def run_record(index: int, command: list[str], workdir: str, wall_seconds: float, history: list[dict[str, Any]],
               summary: dict[str, Any], target: float) -> dict[str, Any]:
    epochs = [{key: entry.get(key) for key in ("epoch", "test_accuracy", "train_seconds", "elapsed_seconds")}
              for entry in history]
    reached = first_epoch_reaching(epochs, target)
    return {
        "run": index,
        "workdir": workdir,
        "command": shlex.join(command),
        "epochs": epochs,
        "target_epoch": reached["epoch"] if reached else None,
        "target_train_seconds": reached["train_seconds"] if reached else None,
        "target_elapsed_seconds": reached["elapsed_seconds"] if reached else None,
        "final_test_accuracy": summary["test_accuracy"],
        "final_train_seconds": epochs[-1]["train_seconds"] if epochs else None,
        "wall_seconds": wall_seconds,  # the whole subprocess: start-up, data preparation, training, evaluation
        "steps": summary.get("steps"),
        "stopped_early_after_epoch": summary.get("stopped_early_after_epoch"),
        "devices": summary.get("devices"),
        "precision": summary.get("precision"),
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [run["final_test_accuracy"] for run in runs]
    reached = [run for run in runs if run["target_epoch"] is not None]
    return {
        "runs": len(runs),
        "final_test_accuracy_mean": statistics.fmean(finals),
        "final_test_accuracy_min": min(finals),
        "final_test_accuracy_max": max(finals),
        "runs_reaching_target": len(reached),
        # Over the runs that reached it only: a run that never did has no time to average.
        "mean_train_seconds_to_target": (statistics.fmean(run["target_train_seconds"] for run in reached)
                                         if reached else None),
        "mean_elapsed_seconds_to_target": (statistics.fmean(run["target_elapsed_seconds"] for run in reached)
                                           if reached else None),
    }


def environment(args: argparse.Namespace, argv: list[str], date: str, summary: dict[str, Any],
                runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "devices": summary.get("devices"),
        "strategy": summary.get("strategy"),
        "num_replicas": summary.get("num_replicas"),
        "precision": summary.get("precision"),
        "tensorflow_version": summary.get("tensorflow_version"),
        "cpu_count": os.cpu_count(),
        "date_utc": date,
        "cwd": os.getcwd(),
        "command": shlex.join([sys.executable, "-m", "benchmarks.time_to_accuracy", *argv]),
        "launcher_commands": [run["command"] for run in runs],
    }


def run(args: argparse.Namespace, argv: list[str]) -> tuple[int, dict[str, Any] | None]:
    """Runs every launch; returns (exit code, results or None if a run failed)."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    root = args.workdir_root or tempfile.mkdtemp(prefix="time_to_accuracy_")
    os.makedirs(root, exist_ok=True)
    runs: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for index in range(1, args.runs + 1):
        workdir = run_workdir(root, index)
        command = launcher_command(args, workdir)
        print(f"=== run {index}/{args.runs}: {shlex.join(command)}", flush=True)
        code, wall_seconds, tail = run_launcher(command, f"run {index}")
        if code != 0:
            print(f"error: run {index} of {args.runs} failed with exit code {code} (work directory {workdir}).\n"
                  f"command: {shlex.join(command)}\nlast {len(tail)} lines of its output:\n" + "\n".join(tail),
                  file=sys.stderr, flush=True)
            return code, None
        try:
            history, summary = read_run(workdir)
        except (OSError, ValueError, RuntimeError) as error:
            print(f"error: run {index} of {args.runs}: {error}", file=sys.stderr, flush=True)
            return 1, None
        runs.append(run_record(index, command, workdir, wall_seconds, history, summary, args.target))
    results = {
        "job": args.job,
        "target": args.target,
        "overrides": args.overrides,
        "gpus": args.gpus,
        "workdir_root": root,
        "environment": environment(args, argv, date, summary, runs),
        "aggregate": aggregate(runs),
        "runs": runs,
    }
    return 0, results


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(results: dict[str, Any]) -> str:
    env, agg, runs = results["environment"], results["aggregate"], results["runs"]
    target = results["target"]
    job = os.path.relpath(results["job"], REPO)
    job = results["job"] if job.startswith("..") else job
    lines = [f"Time to {target:.2%} test accuracy: {job}, {agg['runs']} run(s)",
             f"{env['hostname']}: {', '.join(env['devices'] or [])} ({env['num_replicas']} replica(s) of "
             f"{env['strategy']}), {env['precision']}, TensorFlow {env['tensorflow_version']}, {env['date_utc']}",
             "", f"{'run':>4s} {'final acc':>10s} {'epoch>=target':>14s} {'train s to target':>18s} "
             f"{'elapsed s to target':>20s} {'train s':>9s} {'wall s':>8s}"]
    for run in runs:
        lines.append(f"{run['run']:4d} {run['final_test_accuracy']:10.2%} "
                     f"{'-' if run['target_epoch'] is None else run['target_epoch']:>14} "
                     f"{_seconds(run['target_train_seconds']):>18s} {_seconds(run['target_elapsed_seconds']):>20s} "
                     f"{_seconds(run['final_train_seconds']):>9s} {run['wall_seconds']:8.1f}")
    lines += ["", "test accuracy after each epoch (train seconds so far)",
              f"{'epoch':>5s} " + " ".join(f"{'run ' + str(run['run']):>18s}" for run in runs)]
    for position in range(max(len(run["epochs"]) for run in runs)):
        entries = [run["epochs"][position] if position < len(run["epochs"]) else None for run in runs]
        epoch = next(entry["epoch"] for entry in entries if entry is not None)
        cells = ["" if entry is None else f"{entry['test_accuracy']:7.2%} ({_seconds(entry['train_seconds']):>7s})"
                 for entry in entries]
        lines.append(f"{epoch:5d} " + " ".join(f"{cell:>18s}" for cell in cells))
    lines += ["", f"final accuracy: mean {agg['final_test_accuracy_mean']:.2%}, min "
                  f"{agg['final_test_accuracy_min']:.2%}, max {agg['final_test_accuracy_max']:.2%}",
              f"reached {target:.2%}: {agg['runs_reaching_target']} of {agg['runs']} run(s); mean train seconds to "
              f"target {_seconds(agg['mean_train_seconds_to_target'])} (elapsed "
              f"{_seconds(agg['mean_elapsed_seconds_to_target'])})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        check_args(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        code, results = run(args, argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    if results is None:
        return code
    output = args.json or os.path.join(results["workdir_root"], "time_to_accuracy.json")
    with open(output, "w", encoding="utf-8") as stream:
        json.dump(results, stream, indent=2)
    print(table(results))
    print(f"\nwrote {output}")
    return code


if __name__ == "__main__":
    sys.exit(main())
