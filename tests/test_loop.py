"""The training loop in-process, flax-style: width 4, global batch 8, a few steps on 96 generated images.

The quick tier's check of train_and_evaluate: every section runs (data, model, restore,
steps, evaluation, checkpoints, summaries), a resumed run ends bit for bit where an
uninterrupted one does, and a NaN stops the run with the last good checkpoint kept.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from launcher.strategy import make_strategy
from resnet18.config import RuntimeConfig, build_config
from resnet18.runtime.errors import RetryableError, TrainingError
from resnet18.training import loop
from resnet18.training.loop import train_and_evaluate
from tests.conftest import MICRO_TEST, MICRO_TRAIN, TINY_JOB

BATCH = 8
STEPS_PER_EPOCH = MICRO_TRAIN // BATCH


def micro_config(data_dir: str, *overrides: str):
    return build_config(TINY_JOB, [
        f"data.data_dir={data_dir}", f"data.generated.train_examples={MICRO_TRAIN}",
        f"data.generated.test_examples={MICRO_TEST}", "model.width=4", f"train.global_batch_size={BATCH}",
        "train.epochs=1", "train.steps_per_loop=4", "train.checkpoint_every_steps=5", "train.precision=float32",
        *overrides])


@pytest.fixture(scope="module")
def one_device():
    return make_strategy(RuntimeConfig(strategy="one_device"))


def test_one_epoch_trains_evaluates_every_example_and_writes_its_outputs(micro_data_dir, tmp_path, one_device):
    workdir = tmp_path / "run"
    summary = train_and_evaluate(micro_config(micro_data_dir), one_device, str(workdir))
    assert summary["steps"] == STEPS_PER_EPOCH and summary["test_examples"] == MICRO_TEST
    assert sum(map(sum, summary["confusion_matrix"])) == MICRO_TEST
    checkpoints = sorted(path.name for path in (workdir / "checkpoints").glob("ckpt-*.index"))
    assert checkpoints == ["ckpt-10.index", "ckpt-12.index", "ckpt-5.index"]  # every 5 steps and the epoch end
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in history] == [STEPS_PER_EPOCH]
    assert json.loads((workdir / "summary.json").read_text())["weights_sha256"] == summary["weights_sha256"]
    assert list((workdir / "tensorboard" / "test").glob("events.out.tfevents.*"))


def test_a_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(micro_data_dir, tmp_path, one_device):
    # A constant rate: the schedule does not depend on the number of epochs, so stopping after
    # epoch 1 and going on to 2 must give exactly the weights of 2 epochs in one go.
    exact = ("train.deterministic=true", "train.lr_schedule=constant", "train.warmup_epochs=0")
    whole = train_and_evaluate(micro_config(micro_data_dir, "train.epochs=2", *exact),
                               one_device, str(tmp_path / "whole"))
    train_and_evaluate(micro_config(micro_data_dir, "train.epochs=1", *exact), one_device, str(tmp_path / "split"))
    resumed = train_and_evaluate(micro_config(micro_data_dir, "train.epochs=2", *exact),
                                 one_device, str(tmp_path / "split"))
    assert resumed["resumed_from_step"] == STEPS_PER_EPOCH and resumed["steps"] == 2 * STEPS_PER_EPOCH
    assert resumed["weights_sha256"] == whole["weights_sha256"]


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(micro_data_dir, tmp_path, one_device):
    workdir = str(tmp_path / "run")
    train_and_evaluate(micro_config(micro_data_dir), one_device, workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    exploding = micro_config(micro_data_dir, "train.epochs=2", "train.learning_rate=1.0e+30", "train.lr_scaling=none")
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) in steps \d+-\d+"):
        train_and_evaluate(exploding, one_device, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.parametrize("epochs, pruned, ends", [(1, False, "done"), (2, True, "stopped_early"),
                                                  (2, False, "preempted")])
def test_a_sigterm_in_the_last_call_of_a_run_that_is_complete_exits_0_not_138(
        micro_data_dir, tmp_path, one_device, monkeypatch, capsys, epochs, pruned, ends):
    """A real SIGTERM to this process during the training call that ends epoch 1: the loop evaluates and saves
    that epoch, then exits 138 (RetryableError) only if there is more to train. Ended by its last epoch or by a
    sweep's pruner at that epoch, the run is complete: 138 would have the cluster restart it (and a pruned
    trial resume past its prune). The last case is the control: epoch 2 is left, so it is a preemption."""
    real_calls = loop.make_train_calls

    def calls_signalled_in_epoch_1s_last(*args, **kwargs):
        calls, done = real_calls(*args, **kwargs), [0]

        def call(iterator, steps):
            done[0] += int(steps)
            if done[0] == STEPS_PER_EPOCH:  # handled by the watcher before the loop asks whether to stop
                os.kill(os.getpid(), signal.SIGTERM)
            return calls(iterator, steps)
        return call

    monkeypatch.setattr(loop, "make_train_calls", calls_signalled_in_epoch_1s_last)
    config = micro_config(micro_data_dir, f"train.epochs={epochs}", "train.checkpoint_every_steps=0")
    workdir = tmp_path / "run"

    def run():
        return train_and_evaluate(config, one_device, str(workdir), stop_after_epoch=lambda metrics: pruned)

    if ends == "preempted":
        with pytest.raises(RetryableError, match=f"checkpoint saved at step {STEPS_PER_EPOCH}, the end of epoch 1"):
            run()
    else:
        summary = run()
        assert summary["steps"] == STEPS_PER_EPOCH
        assert f"SIGTERM during or after the last training step ({STEPS_PER_EPOCH})" in capsys.readouterr().out
    assert json.loads((workdir / "status.json").read_text())["state"] == ends
    assert (workdir / "checkpoints" / f"ckpt-{STEPS_PER_EPOCH}.index").exists()


def test_a_sigterm_while_the_chief_writes_its_report_stops_the_report_not_the_finished_run(
        micro_data_dir, tmp_path, one_device, monkeypatch, capsys):
    """After training the launcher's SIGTERM handler is again the one for "before training started" (exit 138,
    a restart of a finished run). A real SIGTERM in the middle of the report (its curves drawn, the confusion
    matrix next) now stops the report only, and the run goes on to exit 0."""
    import launcher.__main__ as launcher_main
    from launcher import report
    from resnet18.runtime.preemption import preempted_before_training

    workdir = tmp_path / "run"
    train_and_evaluate(micro_config(micro_data_dir), one_device, str(workdir))
    real_plot = report.plot_confusion
    monkeypatch.setattr(report, "plot_confusion", lambda *args: (os.kill(os.getpid(), signal.SIGTERM),
                                                                real_plot(*args)))
    before = signal.signal(signal.SIGTERM, preempted_before_training)  # as launcher.__main__.run() sets it
    try:
        launcher_main._write_report(str(workdir))
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # the exit code is decided
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "SIGTERM while writing the report: training is complete; exiting 0" in capsys.readouterr().out
    assert (workdir / "report" / "curves.png").exists() and not (workdir / "report" / "report.md").exists()


@pytest.mark.parametrize("rule", ["train.lr_schedule=plateau", "train.early_stopping_patience=2",
                                  "train.best_checkpoint_metric=test_accuracy"])
def test_resuming_epochs_no_evaluator_evaluated_with_a_rule_that_replays_them_exits_2_naming_it(
        micro_data_dir, tmp_path, one_device, rule):
    # Epochs trained with sidecar evaluation that no evaluator evaluated have no test metrics in the history;
    # resumed with inline evaluation, the epoch rules replaying them hit a KeyError traceback (exit 1), the
    # best checkpoint only after a whole epoch of training.
    from resnet18.runtime.errors import ConfigError

    workdir = str(tmp_path / "run")
    train_and_evaluate(micro_config(micro_data_dir, "train.evaluation=sidecar"), one_device, workdir)
    with pytest.raises(ConfigError, match=rf"{rule.split('=')[0].replace('lr_schedule', 'lr_schedule plateau')}"
                                          r" replays .* epoch\(s\) \[1\]"):
        train_and_evaluate(micro_config(micro_data_dir, "train.epochs=2", rule), one_device, workdir)


def test_ema_turned_on_at_a_resume_that_saved_nothing_leaves_the_run_exportable(micro_data_dir, tmp_path, one_device):
    # Run again with train.ema_decay once training is complete: config.yaml now keeps an average, which no
    # checkpoint holds yet. Export (and a teacher, and train.init_from) read `ema_model` by config.yaml alone
    # and refused the run ("do not fit the model config.yaml describes", exit 2).
    from launcher.export import load_trained_model
    from resnet18.training.summary import weights_fingerprint

    workdir = str(tmp_path / "run")
    trained = train_and_evaluate(micro_config(micro_data_dir), one_device, workdir)
    train_and_evaluate(micro_config(micro_data_dir, "train.ema_decay=0.99"), one_device, workdir)
    config, _, model, prefix = load_trained_model(workdir)
    assert config.train.ema_decay == 0.99 and prefix.endswith(f"ckpt-{STEPS_PER_EPOCH}")
    assert weights_fingerprint(model) == trained["weights_sha256"]


def test_a_finished_run_fine_tunes_on_data_with_other_classes(micro_data_dir, tmp_path, one_device):
    # train.init_from rebuilt the source's network with this run's classes: its classifier's kernel did not fit
    # the checkpoint, and fine-tuning a 10-class run on 2 classes exited 2 ("do not fit this job's model").
    from tests.test_data import write_image_folder

    source = str(tmp_path / "cifar")
    train_and_evaluate(micro_config(micro_data_dir), one_device, source)
    write_image_folder(tmp_path / "pets", sizes=(32, 32), counts=(("train", 16), ("test", 8)))
    job = tmp_path / "pets.yaml"
    job.write_text(f"name: pets\ndata: {{source: image_folder, image_folder: {tmp_path / 'pets'}}}\n"
                   f"model: {{width: 4}}\ntrain: {{epochs: 1, global_batch_size: {BATCH}, precision: float32, "
                   f"init_from: {source}}}\n")
    tuned = train_and_evaluate(build_config(str(job)), one_device, str(tmp_path / "pets_run"))
    assert tuned["class_names"] == ["cats", "dogs"] and len(tuned["confusion_matrix"]) == 2
