"""The CPU smoke job end to end, exactly as a user runs it: `python -m launcher --job jobs/cpu_smoke.yaml`."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # the whole CPU smoke job



def test_cpu_smoke_job_end_to_end(smoke_run):
    result, workdir = smoke_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["strategy"] == "OneDeviceStrategy" and summary["num_replicas"] == 1
    assert summary["epochs"] == 6 and summary["steps"] == 6 * (4000 // 128)
    assert summary["test_examples"] == 1000
    assert summary["test_accuracy"] > 0.4, summary  # 10 classes: chance is 0.1
    assert summary["train_images_per_sec"] > 0
    assert "Done: test_accuracy" in result.stdout
    assert (workdir / "config.yaml").exists() and list((workdir / "checkpoints").glob("ckpt-*.index"))
    assert list((workdir / "tensorboard" / "train").glob("events.out.tfevents.*"))
