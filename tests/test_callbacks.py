"""Epoch-end rules against Keras' own ReduceLROnPlateau and EarlyStopping callbacks."""

from __future__ import annotations

import random

import keras
import pytest

from resnet18.training import epoch_rules as callbacks


@pytest.mark.parametrize("trial", range(20))
def test_plateau_and_early_stopping_rules_match_keras_callbacks(trial):
    rng = random.Random(trial)
    # Losses that go down, stall and wobble, with exact repeats: the ties matter.
    losses = [round(1.0 - 0.05 * i + rng.choice([0, 0, 0.03, 0.1]), 2) for i in range(25)]
    factor, patience, min_delta = 0.5, rng.randint(1, 4), rng.choice([0.0, 1e-4, 0.02])
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
    reduce = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=factor, patience=patience,
                                               min_delta=min_delta, min_lr=0.0)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, min_delta=min_delta)
    for callback in (reduce, stop):
        callback.set_model(model)
        callback.on_train_begin()
    stopped_at = None
    for epoch, loss in enumerate(losses):
        reduce.on_epoch_end(epoch, {"val_loss": loss})
        expected_scale = float(model.optimizer.learning_rate.numpy())
        assert callbacks.plateau_scale(losses[:epoch + 1], factor, patience, min_delta) == pytest.approx(expected_scale)
        stop.on_epoch_end(epoch, {"val_loss": loss})
        if model.stop_training and stopped_at is None:
            stopped_at = epoch + 1
        if stopped_at is None:
            assert callbacks.early_stop_epoch(losses[:epoch + 1], patience, min_delta) is None
    assert callbacks.early_stop_epoch(losses, patience, min_delta) == stopped_at


def test_best_epoch_picks_the_first_of_the_best():
    history = [{"test_accuracy": 0.5, "test_loss": 1.0}, {"test_accuracy": 0.7, "test_loss": 0.8},
               {"test_accuracy": 0.7, "test_loss": 0.9}, {"test_accuracy": 0.6, "test_loss": 0.7}]
    assert callbacks.best_epoch(history, "test_accuracy") == 1
    assert callbacks.best_epoch(history, "test_loss") == 3
    assert callbacks.best_epoch([], "test_loss") is None
