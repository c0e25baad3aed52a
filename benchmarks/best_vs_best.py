"""Best against best: our end to end at auto precision against PyTorch's fastest path, alternated.

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # not a dependency of the launcher
    python -m benchmarks.best_vs_best --rounds 3 --json benchmarks/results_best_vs_best_cpu_2core.json
    ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.best_vs_best --rounds 3   # as on a CPU without AVX-512

Each round runs, in fresh processes and in an order rotated from round to round (so neither side always
runs first on a warm or a throttled machine):
  - ours: `benchmarks.throughput` with the model step in float32 and, where the CPU has native bfloat16,
    bfloat16, and end to end at the precision `auto` picks (the launcher's default);
  - PyTorch: `benchmarks.pytorch_twin` eager and torch.compile'd, float32 and bfloat16 autocast (bfloat16
    only where the CPU has it natively, as our side; elsewhere autocast emulates it, several times slower).
Same network, batch and step (SGD-Nesterov, cross-entropy), channels-last for PyTorch. Prints and writes
each measurement's median and spread (min-max) over the rounds and the ratios the targets are stated in:
ours end to end / PyTorch's best median, ours end to end / our model step at the same precision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.throughput import REPO, publish
from launcher.cluster import environment_without_cluster

TARGETS = {"end_to_end_vs_pytorch_best": 1.0, "end_to_end_vs_model": 0.95}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.best_vs_best", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def _python(module: str, args: list[str]) -> str:
    env = environment_without_cluster()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def ours(args: argparse.Namespace, native_bfloat16: bool) -> dict[str, float]:
    """Our model step per precision and end to end at auto, from one `benchmarks.throughput` process."""
    with tempfile.TemporaryDirectory(prefix="best_vs_best_") as scratch:
        path = os.path.join(scratch, "ours.json")
        _python("benchmarks.throughput", [
            "--width", str(args.width), "--batch", str(args.batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--xla", "false", "--batch_norm", "fused",
            "--precisions", "float32,bfloat16" if native_bfloat16 else "float32",
            "--skip", "keras_fit,workers,startup", "--json", path])
        with open(path, encoding="utf-8") as stream:
            found = json.load(stream)
    measured = {f"ours model step {entry['precision']}": entry["images_per_sec"] for entry in found["model_step"]}
    measured.update({f"ours model step {entry['precision']} MFU": entry["mfu"] for entry in found["model_step"]})
    measured[f"ours end to end (auto = {found['precision']})"] = found["end_to_end_images_per_sec"]
    return measured


def pytorch(args: argparse.Namespace, precision: str, compiled: bool) -> dict[str, float]:
    output = _python("benchmarks.pytorch_twin", [
        "--width", str(args.width), "--batch", str(args.batch), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--precision", precision, "--compile", str(int(compiled))])
    found = json.loads(output.strip().splitlines()[-1])
    path = "torch.compile" if compiled else "eager"
    return {f"pytorch {path} {precision}{' autocast' if precision == 'bfloat16' else ''}": found["images_per_sec"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # noqa: F401  (fails here, before any measurement, when PyTorch is not installed)

    from resnet18.runtime import hardware

    native_bfloat16 = hardware.has_native_bfloat16(hardware.cpu_flags())  # within ONEDNN_MAX_CPU_ISA's cap
    runs = [lambda: ours(args, native_bfloat16)]
    for precision in ("float32", "bfloat16") if native_bfloat16 else ("float32",):
        for compiled in (False, True):
            runs.append(lambda precision=precision, compiled=compiled: pytorch(args, precision, compiled))
    rounds: list[dict[str, float]] = []
    for number in range(args.rounds):
        measured: dict[str, float] = {}
        shift = number % len(runs)
        for measure in runs[shift:] + runs[:shift]:
            measured.update(measure())
        rounds.append(measured)
        print(f"round {number + 1}: {json.dumps({name: round(value, 3) for name, value in measured.items()})}",
              flush=True)
    names = list(rounds[0])
    medians = {name: statistics.median(measured[name] for measured in rounds) for name in names}
    spread = {name: [min(measured[name] for measured in rounds), max(measured[name] for measured in rounds)]
              for name in names}
    end_to_end = next(name for name in names if name.startswith("ours end to end"))
    precision = end_to_end.split("= ")[1].rstrip(")")
    best = max((name for name in names if name.startswith("pytorch")), key=medians.get)
    return {"cpu": hardware.cpu_summary(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
            "date": time.strftime("%Y-%m-%d"), "width": args.width, "batch": args.batch, "steps": args.steps,
            "rounds": rounds, "median": medians, "spread": spread, "pytorch_best": best,
            "ratios": {"end_to_end_vs_pytorch_best": medians[end_to_end] / medians[best],
                       "end_to_end_vs_model": medians[end_to_end] / medians[f"ours model step {precision}"]}}


def table(results: dict[str, Any]) -> str:
    lines = [f"ResNet18 width {results['width']}, batch {results['batch']}, {results['cpu']}, oneDNN ISA "
             f"{results['onednn_max_cpu_isa']}, {results['date']}; {len(results['rounds'])} rounds alternated", "",
             f"{'images/s':42s} {'median':>8s} {'min-max':>15s}"]
    for name, median in results["median"].items():
        low, high = results["spread"][name]
        if name.endswith("MFU"):
            lines.append(f"  {name:40s} {median:8.1%} {low:7.1%}-{high:.1%}")
        else:
            lines.append(f"  {name:40s} {median:8.1f} {low:7.1f}-{high:.1f}")
    lines += ["", f"PyTorch's best: {results['pytorch_best']}", f"{'ratio':42s} {'median':>8s} {'target':>8s}"]
    for name, value in results["ratios"].items():
        verdict = "ok" if value >= TARGETS[name] else "MISSED"
        lines.append(f"  {name:40s} {value:8.2f} {TARGETS[name]:8.2f}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    publish(results, table(results), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
