"""train_and_evaluate end to end on tiny data: outputs, replicas, resume, NaN."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import pytest

from resnet18.config import RuntimeConfig, build_config
from launcher.strategy import make_strategy
from resnet18.training.loop import train_and_evaluate
from tests.conftest import TINY_JOB, TINY_TEST, TINY_TRAIN, run_launcher

SUMMARY_KEYS = {"test_accuracy", "test_loss", "epochs", "steps", "global_batch_size", "strategy",
                "num_replicas", "train_images_per_sec", "wall_seconds", "tensorflow_version"}


def tiny_config(data_dir: str, *overrides: str):
    return build_config(TINY_JOB, [f"data.data_dir={data_dir}", *overrides])


@pytest.mark.slow
def test_one_device_run_writes_checkpoint_tensorboard_config_and_summary(tiny_data_dir, tmp_path):
    config = tiny_config(tiny_data_dir, "train.epochs=6", "model.width=8")
    workdir = str(tmp_path / "run")
    summary = train_and_evaluate(config, make_strategy(RuntimeConfig(strategy="one_device")), workdir)

    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as stream:
        written = json.load(stream)
    assert SUMMARY_KEYS <= set(written)
    assert written["steps"] == 6 * (TINY_TRAIN // 64) and written["num_replicas"] == 1
    assert written["strategy"] == "OneDeviceStrategy" and written["test_examples"] == TINY_TEST
    assert written["test_accuracy"] == summary["test_accuracy"] > 0.2  # 10 classes: chance is 0.1
    assert written["history"][-1]["train_loss"] < written["history"][0]["train_loss"]
    assert glob.glob(os.path.join(workdir, "checkpoints", "ckpt-60.index"))
    assert glob.glob(os.path.join(workdir, "tensorboard", "train", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(workdir, "tensorboard", "test", "events.out.tfevents.*"))
    # The config of the checkpoints, with the precision `auto` resolved to on this machine.
    resolved = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=written["precision"]))
    assert build_config(os.path.join(workdir, "config.yaml")) == resolved


@pytest.mark.slow
def test_two_cpu_replicas_see_what_one_replica_sees_at_the_same_global_batch(tiny_data_dir, tmp_path):
    # A learning rate of 1e-12 keeps the weights where they start, so both runs evaluate the same
    # model on every step: with synchronized batch norm the forward pass is the same function of the
    # global batch, and equal losses and equal correct counts mean both trained on the same examples
    # with the same augmentation. (How far the weights drift apart under a real learning rate is a
    # matter of round-off amplified by training; tests/test_replicas.py checks the step math itself.)
    common = ["--job", TINY_JOB, "--set", f"data.data_dir={tiny_data_dir}", "model.sync_bn=true",
              "train.learning_rate=1e-12", "train.precision=float32", "train.epochs=2"]
    one = run_launcher(*common, "--strategy", "one_device", "--workdir", str(tmp_path / "one"))
    two = run_launcher(*common, "--cpu_replicas", "2", "--workdir", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["num_replicas"] == 2 and two["strategy"] == "MirroredStrategy"
    assert one["steps"] == two["steps"]
    for first, second in zip(one["history"], two["history"]):
        # float32 sums of the same terms in another order; synchronized BN's E[x^2] - E[x]^2
        # loses a few more digits to cancellation: 1e-5 relative.
        assert second["train_loss"] == pytest.approx(first["train_loss"], rel=1e-5)
        assert second["train_accuracy"] == first["train_accuracy"]  # counts of correct predictions


@pytest.mark.slow
def test_rerun_resumes_from_the_checkpoint(tiny_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    strategy = make_strategy(RuntimeConfig(strategy="one_device"))
    first = train_and_evaluate(tiny_config(tiny_data_dir, "train.epochs=1"), strategy, workdir)
    second = train_and_evaluate(tiny_config(tiny_data_dir, "train.epochs=2"), strategy, workdir)
    steps = TINY_TRAIN // 64
    assert (first["steps"], second["resumed_from_step"], second["steps"]) == (steps, steps, 2 * steps)
    assert len(second["history"]) == 1  # only epoch 2 was trained
    done = train_and_evaluate(tiny_config(tiny_data_dir, "train.epochs=2"), strategy, workdir)
    assert done["resumed_from_step"] == 2 * steps and done["history"] == []
    assert done["test_accuracy"] == pytest.approx(second["test_accuracy"])
