"""Where kinds of training meet other features: SimCLR with a sidecar evaluator or gradient
accumulation, heads and precision across a resume, a warm start on a resumed run.

Each of these combinations was accepted and then broke (issue #21); each test here failed
on the code before the task seam.
"""

from __future__ import annotations

import json
import shutil

import pytest

from launcher.strategy import make_strategy
from resnet18.config import RuntimeConfig
from resnet18.runtime.errors import ConfigError
from resnet18.training.loop import train_and_evaluate
from tests.conftest import TINY_JOB, run_launcher
from tests.processes import Running
from tests.test_loop import micro_config

SIMCLR = ("train.task=simclr", "train.label_smoothing=0", "simclr.knn_k=20", "simclr.crop_scale_min=0.3")


@pytest.fixture(scope="module")
def one_device():
    return make_strategy(RuntimeConfig(strategy="one_device"))


def test_simclr_refuses_gradient_accumulation_naming_both_keys():
    # Micro-batches would each gather only their own projections: the negatives would not be the
    # global batch's, which is what SimCLR here promises.
    result = run_launcher("--job", TINY_JOB, "--set", *SIMCLR, "train.grad_accum_steps=2", "--dry_run", timeout=60)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "train.grad_accum_steps" in result.stderr and "simclr" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_changed_projection_head_on_resume_is_refused_naming_the_key(micro_data_dir, tmp_path, one_device):
    workdir = str(tmp_path / "run")
    train_and_evaluate(micro_config(micro_data_dir, *SIMCLR), one_device, workdir)
    with pytest.raises(ConfigError, match=r"simclr\.projection_dim: 128 -> 64"):
        train_and_evaluate(micro_config(micro_data_dir, *SIMCLR, "train.epochs=2", "simclr.projection_dim=64"),
                           one_device, workdir)


def test_precision_may_change_on_resume_and_the_change_is_recorded(micro_data_dir, tmp_path, one_device):
    # float16 keeps a loss scale beside the optimizer; a run resumed in float32 (another machine,
    # auto resolving differently) must still find its optimizer state, and say what changed.
    workdir = tmp_path / "run"
    first = train_and_evaluate(micro_config(micro_data_dir, "train.precision=float16"), one_device, str(workdir))
    assert first["precision"] == "float16"
    resumed = train_and_evaluate(micro_config(micro_data_dir, "train.precision=float32", "train.epochs=2"),
                                 one_device, str(workdir))
    assert resumed["resumed_from_step"] == first["steps"] and resumed["precision"] == "float32"
    records = [json.loads(line) for line in (workdir / "config_changes.jsonl").read_text().splitlines()]
    assert "train.precision: 'float16' -> 'float32'" in records[-1]["changes"]


def test_the_config_of_the_checkpoints_names_the_precision_auto_resolved_to(micro_data_dir, tmp_path, one_device):
    summary = train_and_evaluate(micro_config(micro_data_dir, "train.precision=auto"), one_device,
                                 str(tmp_path / "run"))
    assert summary["precision"] in ("float32", "bfloat16")
    assert f"precision: {summary['precision']}" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_resumed_run_does_not_need_its_warm_start_source_any_more(micro_data_dir, tmp_path, one_device):
    source, target = tmp_path / "source", tmp_path / "target"
    train_and_evaluate(micro_config(micro_data_dir), one_device, str(source))
    started = train_and_evaluate(micro_config(micro_data_dir, f"train.init_from={source}"), one_device, str(target))
    shutil.rmtree(source)  # its weights are in the target's own checkpoints now
    resumed = train_and_evaluate(micro_config(micro_data_dir, f"train.init_from={source}", "train.epochs=2"),
                                 one_device, str(target))
    assert resumed["resumed_from_step"] == started["steps"]


@pytest.mark.slow
def test_simclr_with_a_sidecar_evaluator_reports_its_knn_monitor(tiny_data_dir, tmp_path):
    result = run_launcher("--workers", "1", "--evaluator", "--job", TINY_JOB, "--workdir", str(tmp_path),
                          "--set", f"data.data_dir={tiny_data_dir}", *SIMCLR, "train.checkpoint_every_steps=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluations = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in evaluations] == [10, 20]
    assert all(entry["knn_accuracy"] == entry["test_accuracy"] for entry in evaluations)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] == evaluations[-1]["test_accuracy"] and summary["evaluation"] == "sidecar"
    assert (tmp_path / "report" / "report.md").exists()


# A frozen evaluator past the workers' end. That the launcher waits longer than the workers' finish
# grace (120 s) is test_operations' test_an_evaluator_silent_longer_than_the_finish_grace_is_waited_for,
# with the grace shortened: a 125 s pause here cost the suite two minutes.
EVALUATOR_PAUSE_SECONDS = 10


@pytest.mark.slow
def test_the_evaluators_faults_and_delays_never_touch_training(tiny_data_dir, tmp_path):
    # The evaluator is killed once (it is restarted alone: the workers go on), then frozen past the
    # workers' end (a CPU evaluator lagging behind GPU workers); it finishes and the run is a success.
    run = Running(["--workers", "1", "--evaluator", "--max_restarts", "1", "--job", TINY_JOB,
                   "--workdir", str(tmp_path), "--set", f"data.data_dir={tiny_data_dir}", "train.epochs=4",
                   "train.checkpoint_every_steps=0"])
    try:
        first = int(run.wait_for(r"Started evaluator \(pid (\d+)").group(1))
        run.wait_for(r"^\[evaluator\] Evaluated ckpt-10 ")
        import os
        import signal
        import time

        os.kill(first, signal.SIGKILL)
        second = int(run.wait_for(r"Restarted evaluator \(pid (\d+)").group(1))
        run.wait_for(r"^\[evaluator\] Evaluated ckpt-20 ")
        os.kill(second, signal.SIGSTOP)
        run.wait_for(r"^\[worker 0\] Final weights sha256")
        time.sleep(EVALUATOR_PAUSE_SECONDS)
        os.kill(second, signal.SIGCONT)
        code = run.finish(timeout=240)
    finally:
        run.process.kill()
    assert code == 0, run.output[-4000:]
    evaluations = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    assert sorted(entry["step"] for entry in evaluations) == [10, 20, 30, 40]
    assert (tmp_path / "logs" / "worker-0.log").read_text().count("===== attempt") == 1  # never restarted
