"""Sweep benchmark: K trials at once against one after another, and where a sweep's own time goes.

    python -m benchmarks.sweep_parallel --json benchmarks/results_sweep_cpu_2core.json   # ~8 min on 2 cores

Runs the same sweep twice in one run (the smoke job, jobs/sweep_cpu_smoke.yaml, --trials N, no
pruner, seed 0: both draw the same values, as the first trials are the sampler's random start-up
ones): with --parallel 1 and with --parallel K. Reports trials per hour of each and their ratio
(the target), and splits the serial sweep's wall time into:
  - start-up: each trial's process start -> end of its first training call (Python, TensorFlow,
    the data, tracing and compiling): what every trial pays again;
  - training: the trial's training calls after the first;
  - the rest of the trial: evaluation, checkpoints, the report, process exit;
  - the sweep itself: the sweep process's own start, Optuna's storage, polling between trials
    and the results at the end (sweep.json, best.yaml, HParams summaries, report plots).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from launcher.cluster import environment_without_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"parallel_vs_serial_trials_per_hour": 1.05}  # on the project's 2-core CPU machine, one run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=2, help="K, the trials at once of the parallel sweep")
    parser.add_argument("--job", default="jobs/cpu_smoke.yaml")
    parser.add_argument("--space", default="jobs/sweep_cpu_smoke.yaml")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="--set for every trial")
    return parser.parse_args(argv)


def run_sweep(args: argparse.Namespace, parallel: int, workdir: str) -> dict[str, Any]:
    """One sweep, timed from outside; its sweep.json and each trial's summary.json."""
    command = [sys.executable, "-m", "launcher.sweep", "--job", args.job, "--space", args.space,
               "--trials", str(args.trials), "--parallel", str(parallel), "--pruner", "none", "--seed", "0",
               "--workdir", workdir] + (["--set", *args.overrides] if args.overrides else [])
    started = time.perf_counter()
    lines: list[tuple[float, str]] = []
    process = subprocess.Popen(command, cwd=REPO, env=environment_without_cluster(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        lines.append((time.perf_counter() - started, line.rstrip()))
    if process.wait() != 0:
        raise SystemExit(f"sweep failed ({process.returncode}):\n" + "\n".join(line for _, line in lines[-30:]))
    wall = time.perf_counter() - started
    with open(os.path.join(workdir, "sweep.json"), encoding="utf-8") as stream:
        sweep = json.load(stream)
    summaries = []
    for trial in sweep["trials"]:
        with open(os.path.join(trial["workdir"], "summary.json"), encoding="utf-8") as stream:
            summaries.append(json.load(stream))
    first_start = next(at for at, line in lines if re.match(r"Trial \d+ started", line))
    last_done = max(at for at, line in lines if re.match(r"Trial \d+ done", line))
    return {"parallel": parallel, "wall_seconds": wall, "trials_per_hour": 3600 * len(summaries) / wall,
            "before_first_trial_seconds": first_start, "after_last_trial_seconds": wall - last_done,
            "trials": [{"number": trial["number"], "params": trial["params"], "value": trial["value"],
                        "wall_seconds": trial["wall_seconds"], "startup_seconds": summary["startup_seconds"],
                        "train_seconds": summary["steps"] * summary["global_batch_size"]
                        / summary["train_images_per_sec"] * (1 - 1 / summary["steps"])}
                       for trial, summary in zip(sweep["trials"], summaries)]}


def breakdown(serial: dict[str, Any]) -> dict[str, float]:
    """The serial sweep's wall time by where it went (seconds)."""
    trials = serial["trials"]
    startup = sum(trial["startup_seconds"] for trial in trials)
    training = sum(trial["train_seconds"] for trial in trials)
    in_trials = sum(trial["wall_seconds"] for trial in trials)
    return {"trial_startup": startup, "trial_training": training, "trial_rest": in_trials - startup - training,
            "sweep_start": serial["before_first_trial_seconds"], "sweep_results": serial["after_last_trial_seconds"],
            "sweep_between_trials": serial["wall_seconds"] - in_trials - serial["before_first_trial_seconds"]
            - serial["after_last_trial_seconds"]}


def cpu_kind() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            text = stream.read()
    except OSError:
        return platform.processor()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|amx[a-z_0-9]*)\b", text)))
    return f"{model.group(1) if model else platform.processor()}; {os.cpu_count()} cores; " + (
        " ".join(flags) if flags else "no AVX-512")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sweep_bench_") as root:
        serial = run_sweep(args, 1, os.path.join(root, "serial"))
        parallel = run_sweep(args, args.parallel, os.path.join(root, "parallel"))
    same = [trial["params"] for trial in serial["trials"]] == [trial["params"] for trial in parallel["trials"]]
    ratio = parallel["trials_per_hour"] / serial["trials_per_hour"]
    results = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(), "job": args.job, "space": args.space,
               "trials": args.trials, "same_values_drawn": same, "serial": serial, "parallel": parallel,
               "serial_breakdown_seconds": breakdown(serial),
               "ratios": {"parallel_vs_serial_trials_per_hour": ratio}, "targets": TARGETS}
    print(f"CPU: {results['cpu']}")
    print(f"{args.trials} trials of {args.job}; the same values drawn in both: {same}")
    for run in (serial, parallel):
        print(f"  --parallel {run['parallel']}: {run['wall_seconds']:.0f} s, {run['trials_per_hour']:.1f} trials/hour")
    print(f"  ratio {ratio:.2f} (target >= {TARGETS['parallel_vs_serial_trials_per_hour']})")
    print("Serial sweep, where the time went:")
    for name, seconds in results["serial_breakdown_seconds"].items():
        print(f"  {name:22s} {seconds:7.1f} s  {100 * seconds / serial['wall_seconds']:5.1f} %")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(results, stream, indent=1)
    return 0 if ratio >= TARGETS["parallel_vs_serial_trials_per_hour"] and same else 1


if __name__ == "__main__":
    sys.exit(main())
