"""The throughput benchmark runs end to end in a tiny configuration; its JSON has every figure.

Speed itself is held by the benchmark (benchmarks/RESULTS.md), not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # a real (tiny) benchmark run

REQUIRED = ("model_images_per_sec", "pipeline_images_per_sec", "end_to_end_images_per_sec",
            "keras_fit_images_per_sec", "peak_flops", "model_flops_per_image", "mfu", "startup_seconds",
            "device", "precision", "batch", "tensorflow_version")


def test_tiny_benchmark_writes_every_key(tmp_path):
    output = tmp_path / "throughput.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--width", "4", "--batch", "32", "--baseline_batch", "32",
         "--steps", "2", "--warmup", "1", "--precisions", "float32", "--xla", "false,true",
         "--batch_norm", "fused,keras", "--end_to_end_precision", "float32", "--pipeline_batches", "10",
         "--skip", "workers", "--json", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(output.read_text())
    for key in REQUIRED:
        assert key in results, key
        if isinstance(results[key], (int, float)):
            assert results[key] > 0, key
    assert [(entry["xla"], entry["batch_norm"]) for entry in results["model_step"]] == [
        (False, "fused"), (False, "keras"), (True, "fused"), (True, "keras")]
    # The headline figure is the model the launcher trains: fused batch norm, no XLA.
    assert results["model_images_per_sec"] == results["model_step"][0]["images_per_sec"]
    # Counted from the model: width 4 is 1/256 of the real ResNet18's ~3.3 GFLOP per training image.
    assert 3.3e9 / 256 * 0.8 < results["model_flops_per_image"] < 3.3e9 / 256 * 1.25
    assert 0 < results["mfu"] < 1
    assert set(results["ratios"]) >= {"end_to_end_vs_model", "pipeline_vs_model", "end_to_end_vs_keras_fit"}
    assert "ratio" in result.stdout and "model step" in result.stdout


def test_kernel_paths_finds_no_difference_in_one_path_and_a_changed_gradient_in_another(tmp_path):
    import numpy as np

    from benchmarks import kernel_paths

    found = kernel_paths.gradients(["model.width=4", "train.deterministic=true"], images=8)
    assert len(found) > 10 and all(np.isfinite(value).all() for value in found.values())
    np.savez(tmp_path / "a.npz", **found)
    np.savez(tmp_path / "b.npz", **kernel_paths.gradients(["model.width=4", "train.deterministic=true"], images=8))
    assert max(difference for difference, _ in kernel_paths.compare(str(tmp_path / "a.npz"),
                                                                    str(tmp_path / "b.npz"))) == 0.0
    changed = dict(found)
    key = next(key for key in changed if key.endswith("kernel"))
    changed[key] = changed[key] * 1.01
    np.savez(tmp_path / "c.npz", **changed)
    rows = kernel_paths.compare(str(tmp_path / "c.npz"), str(tmp_path / "a.npz"))
    assert rows[0][1] == key and abs(rows[0][0] - 0.01) < 1e-6
