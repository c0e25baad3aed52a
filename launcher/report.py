"""Training report: curves, confusion matrix, per-class accuracy and report.md.

Written by the chief at the end of every run, and on demand:

    python -m launcher.report --workdir runs/cpu_smoke

Reads only WORKDIR/config.yaml, summary.json and history.jsonl (TensorFlow only for gs:// paths),
and writes WORKDIR/report/: curves.png, confusion_matrix.png, per_class_accuracy.json
and report.md. Exit 2 when the work directory holds no finished run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from launcher.flags import FlagParser, run_directory  # noqa: E402
from resnet18 import config as config_lib  # noqa: E402
from resnet18.runtime.errors import EXIT_OK, LauncherError, SetupError  # noqa: E402
from resnet18.runtime.files import read_json, read_text  # noqa: E402
from resnet18.runtime.history import read_history  # noqa: E402


def load_run(workdir: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(config, summary, history) of a finished run in `workdir`."""
    summary = read_json(os.path.join(workdir, "summary.json"))
    if summary is None:
        raise SetupError(f"{workdir} holds no finished run: its summary.json is missing or unreadable")
    path = os.path.join(workdir, "config.yaml")
    config_text = read_text(path)
    if config_text is None:
        raise SetupError(f"{workdir} holds a summary.json but no config.yaml: not a work directory of the launcher")
    config_lib.from_yaml_text(config_text, path)  # a damaged one: ConfigError naming it (exit 2)
    return yaml.safe_load(config_text) or {}, summary, read_history(workdir) or summary.get("history", [])


def per_class_accuracy(confusion: list[list[int]], class_names: list[str]) -> dict[str, float | None]:
    """Recall of each class: correct predictions / test examples of that class."""
    result = {}
    for index, name in enumerate(class_names):
        total = sum(confusion[index])
        result[name] = confusion[index][index] / total if total else None
    return result


def plot_curves(history: list[dict[str, Any]], title: str, path: str) -> None:
    epochs = [entry["epoch"] for entry in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for axis, metric, label in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")):
        train_label = f"train {metric}" + (" (incl. weight decay, label smoothing)" if metric == "loss" else "")
        axis.plot(epochs, [entry[f"train_{metric}"] for entry in history], "o-", label=train_label)
        tested = [entry.get(f"test_{metric}") for entry in history]
        if any(value is not None for value in tested):  # a SimCLR run has no test loss; a sidecar adds them late
            axis.plot(epochs, [float("nan") if value is None else value for value in tested], "s-",
                      label=f"test {metric}" + (" (kNN monitor)" if metric == "accuracy" and
                                                "knn_accuracy" in history[-1] else ""))
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.set_title(label)
        axis.grid(alpha=0.3)
        axis.legend()
    axes[1].set_yscale("log")
    rates = [entry.get("learning_rate") for entry in history]
    axes[2].plot(epochs, rates, "o-", color="tab:green", label="learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate")
    axes[2].set_title("Learning rate")
    axes[2].grid(alpha=0.3)
    axes[2].legend()
    figure.suptitle(f"{title}: training curves")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_confusion(confusion: list[list[int]], class_names: list[str], title: str, path: str) -> None:
    size = max(5.0, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axis, label="test examples")
    ticks = range(len(class_names))
    axis.set_xticks(list(ticks), class_names, rotation=45, ha="right")
    axis.set_yticks(list(ticks), class_names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    peak = max(max(row) for row in confusion) or 1
    if len(class_names) <= 20:
        for row, values in enumerate(confusion):
            for column, value in enumerate(values):
                axis.text(column, row, str(value), ha="center", va="center", fontsize=8,
                          color="white" if value > peak / 2 else "black")
    axis.set_title(f"{title}: confusion matrix (test split)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def hardware() -> str:
    from resnet18.runtime.hardware import cpu_summary

    return f"{cpu_summary()}, {platform.system()} {platform.release()}"


def write_report(workdir: str) -> list[str]:
    """Writes WORKDIR/report/ and returns the paths written."""
    config, summary, history = load_run(workdir)
    out = os.path.join(workdir, "report")
    # Remote work directories (gs://): drawn into a private temporary directory, then copied.
    local = out if "://" not in out else tempfile.mkdtemp(prefix="report_")
    os.makedirs(local, exist_ok=True)
    title = summary.get("name") or config.get("name", "run")
    written = []
    if history:
        plot_curves(history, title, os.path.join(local, "curves.png"))
        written.append("curves.png")
    classes = summary.get("class_names") or [str(index) for index in range(len(summary.get("confusion_matrix", [])))]
    per_class = {}
    if summary.get("confusion_matrix"):
        plot_confusion(summary["confusion_matrix"], classes, title, os.path.join(local, "confusion_matrix.png"))
        per_class = per_class_accuracy(summary["confusion_matrix"], classes)
        with open(os.path.join(local, "per_class_accuracy.json"), "w", encoding="utf-8") as stream:
            json.dump(per_class, stream, indent=2)
        written += ["confusion_matrix.png", "per_class_accuracy.json"]
    with open(os.path.join(local, "report.md"), "w", encoding="utf-8") as stream:
        stream.write(_markdown(config, summary, history, per_class, title))
    written.append("report.md")
    if local != out:
        import tensorflow as tf  # gfile writes to buckets

        tf.io.gfile.makedirs(out)
        for name in written:
            tf.io.gfile.copy(os.path.join(local, name), os.path.join(out, name), overwrite=True)
        shutil.rmtree(local, ignore_errors=True)
    return [os.path.join(out, name) for name in written]


def _markdown(config, summary, history, per_class, title) -> str:
    ips = summary.get("train_images_per_sec")
    lines = [
        f"# {title}",
        "",
        f"Report written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}.",
        "",
        "| | |",
        "|---|---|",
        f"| test accuracy | {_number(summary.get('test_accuracy'))} ({summary.get('test_accuracy_of', 'test split')}, "
        f"{summary.get('test_examples', '?')} test examples) |",
        f"| test loss | {_number(summary.get('test_loss'))} |",
        f"| epochs / steps | {summary['epochs']} / {summary['steps']} |",
        f"| strategy | {summary['strategy']}, {summary['num_replicas']} replica(s) |",
        f"| devices | {', '.join(summary.get('devices', []))} |",
        f"| global batch | {summary['global_batch_size']} |",
        f"| training images/s | {ips:.0f} |" if ips else "| training images/s | n/a |",
        f"| wall time | {summary['wall_seconds']:.0f} s "
        f"(this run; resumed from step {summary.get('resumed_from_step', 0)}) |",
        f"| precision | {summary.get('precision', 'float32')} |",
        f"| TensorFlow | {summary['tensorflow_version']} |",
        f"| hardware | {hardware()} |",
        "",
    ]
    if history:
        lines += ["## Training curves", "", "![training curves](curves.png)", "",
                  "| epoch | train loss | train acc | test loss | test acc | learning rate |",
                  "|---|---|---|---|---|---|"]
        for entry in history:
            lines.append(f"| {entry['epoch']} | {entry['train_loss']:.4f} | {entry['train_accuracy']:.4f} | "
                         f"{_number(entry.get('test_loss'))} | {_number(entry.get('test_accuracy'))} | "
                         f"{entry.get('learning_rate', float('nan')):.5f} |")
        lines.append("")
    if per_class:
        lines += ["## Per-class accuracy", "", "![confusion matrix](confusion_matrix.png)", "",
                  "| class | accuracy |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" if value is not None else f"| {name} | n/a |"
                  for name, value in per_class.items()]
        lines.append("")
    lines += ["## Resolved config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m launcher.report", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=run_directory, help="work directory of a finished run")
    try:
        args = parser.parse_args(argv)
        for path in write_report(args.workdir):
            print(path)
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
