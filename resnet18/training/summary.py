"""The run summary: WORKDIR/summary.json, the closing line, and what identifies the final weights.

    python -c "import json; print(json.load(open('runs/cpu_smoke/summary.json'))['test_accuracy'])"
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from resnet18.runtime import hardware
from resnet18.runtime.files import write_json
from resnet18.runtime.topology import describe
from resnet18.training import epoch_rules

_IMPORT_TIME = time.time()


def summarize(loop, progress, source, strategy: tf.distribute.Strategy, precision: str) -> dict[str, Any]:
    """The summary of a finished loop (training.loop's Loop and Progress)."""
    fingerprint = weights_fingerprint(loop.state.model)
    print(f"Final weights sha256 {fingerprint}", flush=True)  # equal on every worker
    metrics = progress.metrics
    metric = loop.config.train.best_checkpoint_metric
    return {
        "name": loop.config.name,
        "task": loop.config.train.task,
        "test_accuracy": metrics.get("test_accuracy"),  # None with sidecar evaluation: the evaluator adds it
        "test_accuracy_of": loop.task.accuracy,
        "test_loss": metrics.get("test_loss"),
        "test_examples": metrics.get("test_examples"),
        "epochs": loop.config.train.epochs,
        "steps": progress.step,
        "resumed_from_step": progress.start_step,
        "stopped_early_after_epoch": progress.stopped_at_epoch,
        "best_checkpoint": _best_checkpoint_entry(progress.epochs_so_far, metric, loop.workdir),
        "global_batch_size": loop.global_batch,
        **describe(strategy),
        "train_images_per_sec": progress.train_images / progress.train_seconds if progress.train_seconds else None,
        "startup_seconds": progress.startup_seconds,
        "first_epoch_seconds": progress.first_epoch_seconds,
        "host_allocator": "bfc" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "") in ("1", "true") else "system",
        "cpu_kernels": hardware.cpu_kernels(),  # TF_ENABLE_ONEDNN_OPTS, or TensorFlow's default
        "wall_seconds": time.time() - loop.wall_start,
        "tensorflow_version": tf.__version__,
        "precision": precision,
        "compute_dtype": _conv_compute_dtype(loop.state.model),  # what the convolutions really ran in
        "weights_sha256": fingerprint,
        "class_names": list(source.class_names),
        "confusion_matrix": metrics.get("confusion_matrix"),
        "history": progress.history,
    }


def _best_checkpoint_entry(history: list[dict[str, Any]], metric: str | None, workdir: str) -> dict[str, Any] | None:
    index = epoch_rules.best_epoch(history, metric) if metric else None
    if index is None:
        return None
    entry = history[index]
    path = os.path.join(workdir, "best", f"ckpt-{entry['step']}")
    return {"metric": metric, "value": entry[metric], "epoch": entry["epoch"], "path": path,
            "on_disk": tf.io.gfile.exists(path + ".index")}


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    """Writes WORKDIR/summary.json and prints the closing line."""
    write_json(os.path.join(workdir, "summary.json"), summary, indent=2)  # read by the evaluator and sweeps
    ips = summary["train_images_per_sec"]
    tested = "test metrics: from the sidecar evaluator"
    if summary["test_accuracy"] is not None:
        tested = f"test_accuracy {summary['test_accuracy']:.4f}" + (
            f"  test_loss {summary['test_loss']:.4f}" if summary["test_loss"] is not None
            else f" ({summary['test_accuracy_of']})")
    print(f"Done: {tested}  steps {summary['steps']}  {summary['num_replicas']} replica(s) of {summary['strategy']}  "
          f"{'%.0f img/s  ' % ips if ips else ''}{summary['wall_seconds']:.0f} s  -> {workdir}", flush=True)


def _conv_compute_dtype(model: keras.Model) -> str | None:
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    return convs[0].compute_dtype if convs else None


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 of every weight's bytes (trainable and BN statistics), to compare runs and workers."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.asarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def process_start_time() -> float:
    """When this process started (epoch seconds), for start-up time."""
    try:
        import psutil  # installed with tensorflow-datasets

        return psutil.Process().create_time()
    except ImportError:
        return _IMPORT_TIME
