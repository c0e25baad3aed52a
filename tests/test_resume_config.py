"""A work directory keeps the config of its checkpoints: changes that reinterpret them are refused, others recorded."""

from __future__ import annotations

import json

import pytest

from launcher.strategy import make_strategy
from resnet18.config import RuntimeConfig, build_config
from resnet18.runtime.errors import ConfigError
from resnet18.training.loop import train_and_evaluate
from tests.test_loop import micro_config


@pytest.fixture(scope="module")
def one_device():
    return make_strategy(RuntimeConfig(strategy="one_device"))


def test_a_resume_that_changes_the_model_data_order_or_step_names_each_key_and_changes_nothing(
        micro_data_dir, tmp_path, one_device):
    workdir = tmp_path / "run"
    train_and_evaluate(micro_config(micro_data_dir), one_device, str(workdir))
    saved_config = (workdir / "config.yaml").read_text()
    before = sorted(path.name for path in (workdir / "checkpoints").iterdir())
    changed = micro_config(micro_data_dir, "train.epochs=2", "model.width=8", "runtime.seed=3",
                           "train.global_batch_size=16")
    with pytest.raises(ConfigError) as raised:
        train_and_evaluate(changed, one_device, str(workdir))
    message = str(raised.value)
    for words in ("model.width: 4 -> 8", "runtime.seed: 1 -> 3", "train.global_batch_size: 8 -> 16"):
        assert words in message
    assert "train.epochs" not in message  # may change: listed only when recorded
    assert (workdir / "config.yaml").read_text() == saved_config  # still the checkpoints' config
    assert sorted(path.name for path in (workdir / "checkpoints").iterdir()) == before


def test_harmless_changes_are_allowed_and_recorded(micro_data_dir, tmp_path, one_device):
    workdir = tmp_path / "run"
    train_and_evaluate(micro_config(micro_data_dir), one_device, str(workdir))
    resumed = train_and_evaluate(micro_config(micro_data_dir, "train.epochs=2", "train.learning_rate=0.2",
                                              "train.checkpoint_every_steps=7"), one_device, str(workdir))
    assert resumed["resumed_from_step"] > 0
    records = [json.loads(line) for line in (workdir / "config_changes.jsonl").read_text().splitlines()]
    assert records[-1]["changes"] == ["train.epochs: 1 -> 2", "train.learning_rate: 0.4 -> 0.2",
                                      "train.checkpoint_every_steps: 5 -> 7"]
    assert build_config(str(workdir / "config.yaml")).train.epochs == 2  # the config of the newest checkpoints


def test_a_dry_run_refuses_what_the_run_would_refuse_before_training(tmp_path):
    """README: "a dry run never promises what the run then refuses". It promised a resume that changes the
    model, and bfloat16 on a CPU without native bfloat16; the real run refused both (exit 2)."""
    from resnet18.config import dump
    from resnet18.runtime import hardware
    from tests.conftest import TINY_JOB, run_launcher

    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "ckpt-8.index").write_bytes(b"")  # a checkpoint the resume check sees
    (workdir / "config.yaml").write_text(dump(build_config(TINY_JOB)))
    result = run_launcher("--job", TINY_JOB, "--workdir", str(workdir), "--set", "model.width=8", "--dry_run",
                          timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "holds checkpoints written with another config" in result.stderr and "model.width" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_launcher("--job", TINY_JOB, "--workdir", str(tmp_path / "other"), "--set",
                          "train.precision=bfloat16", "--dry_run", timeout=120)
    if hardware.resolve_precision("auto", "CPU") == "bfloat16":  # this CPU computes bfloat16 natively
        assert result.returncode == 0, result.stderr[-2000:]
    else:
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert "no native bfloat16" in result.stderr and "Traceback" not in result.stderr
