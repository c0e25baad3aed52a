"""Checkpoint restore that survives damage, and saves that never write NaN weights (in-process, tiny)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from resnet18.runtime.checkpoint_files import (checkpoint_candidates, holds_object, remove_stale_temporaries,
                                               restore_latest_good)
from resnet18.runtime.errors import TrainingError
from resnet18.training.checkpointing import Checkpointer


def saved_steps(directory, steps=(4, 8)) -> tf.Variable:
    variable = tf.Variable(0.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(value=variable), str(directory), max_to_keep=5)
    for step in steps:
        variable.assign(float(step))
        manager.save(checkpoint_number=step)
    return variable


def test_candidates_are_read_from_the_files_newest_first(tmp_path):
    saved_steps(tmp_path, (4, 8, 12))
    (tmp_path / "checkpoint").write_text("garbage")  # the state file is not trusted
    assert [os.path.basename(prefix) for prefix in checkpoint_candidates(str(tmp_path))] == [
        "ckpt-12", "ckpt-8", "ckpt-4"]


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    saved_steps(tmp_path)
    data = next(tmp_path.glob("ckpt-8.data-*"))
    data.write_bytes(data.read_bytes()[:3])
    target = tf.Variable(-1.0)
    prefix = restore_latest_good(tf.train.Checkpoint(value=target), str(tmp_path))
    assert prefix.endswith("ckpt-4") and float(target.numpy()) == 4.0
    assert "ckpt-8 is unreadable" in capsys.readouterr().out


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    saved_steps(tmp_path)
    for data in tmp_path.glob("ckpt-*.data-*"):
        data.write_bytes(b"")
    with pytest.raises(RuntimeError, match="no checkpoint in .* can be read"):
        restore_latest_good(tf.train.Checkpoint(value=tf.Variable(0.0)), str(tmp_path))
    assert restore_latest_good(tf.train.Checkpoint(value=tf.Variable(0.0)), str(tmp_path / "empty")) is None


def test_checkpoints_of_another_model_are_one_error_not_a_warning_per_variable(tmp_path, caplog):
    """A resume or a teacher whose checkpoints do not fit printed the error, then one TensorFlow warning per
    variable left unread (150 lines for a ResNet18) when the failed restore was collected: the error was lost."""
    import gc

    def dense(units: int) -> tf.keras.Model:
        model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(units), tf.keras.layers.Dense(2)])
        return model

    tf.train.CheckpointManager(tf.train.Checkpoint(model=dense(4)), str(tmp_path), 3).save(checkpoint_number=8)
    with pytest.raises(RuntimeError, match="intact but do not fit"):  # restore() raises: a shape differs
        restore_latest_good(tf.train.Checkpoint(model=dense(5)), str(tmp_path))
    other = tmp_path / "other"  # restore() returns, and the check of its status raises: objects missing
    tf.train.CheckpointManager(tf.train.Checkpoint(model=dense(4), a=tf.Variable(1.0), b=tf.Variable(2.0)),
                               str(other), 3).save(checkpoint_number=8)
    with pytest.raises(RuntimeError, match="intact but do not fit"):
        restore_latest_good(tf.train.Checkpoint(model=dense(4), x=tf.Variable(0.0)), str(other))
    gc.collect()
    unread = [record for record in caplog.records if "could not be found in the restored object" in record.message
              or "Value in checkpoint could not be found" in record.message]
    assert not unread, [record.message for record in unread]


def test_leftovers_of_an_interrupted_save_are_removed_and_objects_are_found(tmp_path):
    saved_steps(tmp_path)
    (tmp_path / "ckpt-12_temp").mkdir()
    (tmp_path / "ckpt-12_temp" / "part").write_text("half")
    assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / "ckpt-12_temp")]
    assert holds_object(str(tmp_path), "value") and not holds_object(str(tmp_path), "ema_model")


class TinyState:
    """What a Checkpointer needs from a TrainState."""

    average = None
    loss_scaled = False

    def __init__(self):
        self.step = tf.Variable(0, dtype=tf.int64)
        self.weights = tf.Variable([1.0, 2.0])
        self.evaluated_model = tf.Module()
        self.evaluated_model.weights = self.weights

    def checkpoint(self, with_average: bool = True, with_loss_scale: bool = True) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(step=self.step, weights=self.weights)


def test_saves_refuse_nan_weights_and_keep_the_last_good_checkpoint(tmp_path):
    state = TinyState()
    checkpointer = Checkpointer(state, str(tmp_path), is_chief=True, max_to_keep=3, statistics=None,
                                weights_are_finite=lambda: bool(np.all(np.isfinite(state.weights.numpy()))))
    checkpointer.save(5)
    state.weights.assign([np.nan, 1.0])
    with pytest.raises(TrainingError, match="weights became NaN/Inf by step 9.*ckpt-5"):
        checkpointer.save(9)
    assert [os.path.basename(prefix) for prefix in checkpoint_candidates(str(tmp_path / "checkpoints"))] == ["ckpt-5"]
    restored = TinyState()
    again = Checkpointer(restored, str(tmp_path), is_chief=True, max_to_keep=3, statistics=None,
                         weights_are_finite=lambda: True)
    assert again.restore() == 5 and restored.weights.numpy().tolist() == [1.0, 2.0]


def test_workers_other_than_the_chief_save_into_a_directory_they_delete(tmp_path):
    state = TinyState()
    checkpointer = Checkpointer(state, str(tmp_path), is_chief=False, max_to_keep=3, statistics=None,
                                weights_are_finite=lambda: True)
    checkpointer.save(3)
    assert not (tmp_path / "checkpoints").exists() and os.path.isdir(checkpointer.directory)
    checkpointer.close()
    assert not os.path.exists(checkpointer.directory)


def test_a_weight_average_turned_on_late_starts_from_the_restored_weights_not_a_fresh_init(micro_data_dir, tmp_path):
    from launcher.strategy import make_strategy
    from resnet18.config import RuntimeConfig
    from resnet18.models import build_model
    from resnet18.tasks import task_of
    from resnet18.training.state import build_train_state
    from resnet18.training.loop import train_and_evaluate
    from tests.test_loop import micro_config

    strategy = make_strategy(RuntimeConfig(strategy="one_device"))
    train_and_evaluate(micro_config(micro_data_dir), strategy, str(tmp_path))  # no average in its checkpoints
    config = micro_config(micro_data_dir, "train.epochs=2", "train.ema_decay=0.99")
    state = build_train_state(config, strategy, task_of(config), 10, "float32", steps_per_epoch=12)
    fresh = [weight.numpy() for weight in build_model(config, 10).weights]
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(fresh, state.average.model.weights))  # before restore
    checkpointer = Checkpointer(state, str(tmp_path), is_chief=True, max_to_keep=3, statistics=None,
                                weights_are_finite=lambda: True)
    assert checkpointer.restore() == 12
    trained = [weight.numpy() for weight in state.model.weights]
    average = [weight.numpy() for weight in state.average.model.weights]
    assert all(np.array_equal(a, b) for a, b in zip(trained, average))  # the restored weights, exactly
    assert not all(np.array_equal(a, b) for a, b in zip(fresh, average))  # not the fresh initialisation
