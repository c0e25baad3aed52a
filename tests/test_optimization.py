"""The optimisation recipe: schedule, optimizer and the train step's math, on a tiny model in-process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from resnet18.config import Config, TrainConfig
from resnet18.training.optimizers import make_optimizer
from resnet18.training.schedules import make_schedule, peak_learning_rate
from resnet18.training.step import make_train_step
from tests.helpers_tiny_model import objective
from tests.helpers_tiny_model import batch, run_steps, small_model


def test_gradient_accumulation_4x32_equals_one_step_of_128_without_batch_norm():
    images, labels = batch(128)
    base = TrainConfig(global_batch_size=128, learning_rate=0.5, warmup_epochs=0, lr_schedule="constant",
                       weight_decay=5e-4, label_smoothing=0.1)
    initial = [weight.numpy() for weight in small_model(seed=3).trainable_weights]
    whole = run_steps(base, images, labels)
    accumulated = run_steps(dataclasses.replace(base, grad_accum_steps=4), images, labels)
    for one, four, start in zip(whole, accumulated, initial):
        assert not np.allclose(one, start)  # the steps moved the weights
        np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_differs_with_batch_norm_as_documented():
    # Batch norm normalises each micro-batch by its own statistics, so here the two differ.
    images, labels = batch(128)
    base = TrainConfig(global_batch_size=128, learning_rate=0.5, warmup_epochs=0, lr_schedule="constant")
    whole = run_steps(base, images, labels, batch_norm=True)
    accumulated = run_steps(dataclasses.replace(base, grad_accum_steps=4), images, labels, batch_norm=True)
    assert not all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(whole, accumulated))


def test_decoupled_weight_decay_shrinks_kernels_only_by_lr_times_decay():
    images, labels = batch(32)
    base = TrainConfig(global_batch_size=32, learning_rate=0.1, lr_scaling="none", warmup_epochs=0,
                       lr_schedule="constant", weight_decay=0.0, optimizer="sgd")
    decayed_config = dataclasses.replace(base, weight_decay=0.05, weight_decay_mode="decoupled")
    initial = [weight.numpy() for weight in small_model(seed=3).trainable_weights]
    plain = run_steps(base, images, labels, steps=1)
    decayed = run_steps(decayed_config, images, labels, steps=1)
    names = [weight.path for weight in small_model(seed=3).trainable_weights]
    for name, start, without, with_decay in zip(names, initial, plain, decayed):
        if name.endswith("kernel"):
            np.testing.assert_allclose(with_decay, without - 0.1 * 0.05 * start, rtol=1e-5, atol=1e-6)
        else:  # biases are not decayed
            np.testing.assert_array_equal(with_decay, without)


def test_soft_targets_train_like_their_one_hot_labels():
    images, labels = batch(64)
    train = TrainConfig(global_batch_size=64, warmup_epochs=0)
    from_ids = run_steps(train, images, labels)
    from_targets = run_steps(train, images, tf.one_hot(labels, 10))
    for a, b in zip(from_ids, from_targets):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_schedule_warms_up_linearly_then_decays_to_zero_along_a_cosine():
    config = Config(train=TrainConfig(learning_rate=0.2, global_batch_size=512, warmup_epochs=2, epochs=10))
    schedule = make_schedule(config, steps_per_epoch=10)
    peak = peak_learning_rate(config)
    assert peak == pytest.approx(0.2 * 512 / 256)  # linear scaling: per 256 images
    rates = [float(schedule(step)) for step in range(100)]
    np.testing.assert_allclose(rates[:20], [peak * (step + 1) / 20 for step in range(20)], rtol=1e-6)
    for step in (20, 40, 60, 99):
        expected = peak * 0.5 * (1 + np.cos(np.pi * (step - 20) / 80))
        assert rates[step] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert rates[-1] < 0.001 * peak


def test_constant_schedule_and_the_plateau_scale():
    config = Config(train=TrainConfig(learning_rate=0.1, lr_scaling="none", warmup_epochs=0,
                                      lr_schedule="plateau"))
    schedule = make_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(0.1) and float(schedule(250)) == pytest.approx(0.1)
    schedule.scale.assign(0.1)  # what ReduceLROnPlateau's rule sets after a plateau
    assert float(schedule(250)) == pytest.approx(0.01)


@pytest.mark.parametrize("xla", [True, False])
def test_train_xla_compiles_the_forward_and_backward_pass_and_only_then(xla):
    config = Config(train=TrainConfig(global_batch_size=8, warmup_epochs=0, xla=xla))
    model = small_model(seed=3)
    optimizer = make_optimizer(config, make_schedule(config, 10), model=model)
    optimizer.build(model.trainable_variables)
    images, labels = batch(8)
    step = tf.function(make_train_step(model, optimizer, objective(model, config), config, num_classes=10))
    library = step.get_concrete_function(images, labels).graph.as_graph_def().library
    must_compile = [function.signature.name for function in library.function
                    if function.attr["_XlaMustCompile"].b]
    assert bool(must_compile) == xla


def one_step_update(config: Config, model) -> np.ndarray:
    """The change of every trainable weight after one train step (plain SGD), flattened."""
    optimizer = make_optimizer(config, make_schedule(config, 10), model=model)
    optimizer.build(model.trainable_variables)
    before = [variable.numpy().copy() for variable in model.trainable_variables]
    size = model.input_shape[1]
    images = tf.random.stateless_uniform([32, size, size, 3], [1, 2], maxval=255.0)
    labels = tf.random.stateless_uniform([32], [3, 4], 0, 10, dtype=tf.int32)
    tf.function(make_train_step(model, optimizer, objective(model, config), config, num_classes=10))(images, labels)
    return np.concatenate([(old - variable.numpy()).ravel()
                           for old, variable in zip(before, model.trainable_variables)])


@pytest.mark.parametrize("network, relative_l2", [
    # No batch norm: the same float32 sums in another order; measured 7e-7 on an AMD EPYC.
    ("small", 1e-5),
    # ResNet18 at width 4 in training-mode batch norm, whose kernel gradients are differences of nearly equal
    # terms: round-off is amplified; measured 6.7e-3 with the fused kernel, 1.1e-3 with Keras' layer.
    ("resnet18", 2e-2),
])
def test_xla_computes_the_plain_steps_update_to_round_off(network, relative_l2):
    from resnet18.config import ModelConfig
    from resnet18.models import build_model

    updates = {}
    for xla in (False, True):
        config = Config(model=ModelConfig(width=4), train=TrainConfig(
            global_batch_size=32, warmup_epochs=0, lr_schedule="constant", learning_rate=0.1, momentum=0.0,
            weight_decay=0.0, xla=xla))
        updates[xla] = one_step_update(config, small_model(seed=3) if network == "small" else build_model(config, 10))
    plain, compiled = updates[False], updates[True]
    assert np.linalg.norm(compiled - plain) <= relative_l2 * np.linalg.norm(plain)
    assert plain @ compiled >= 0.9999 * np.linalg.norm(plain) * np.linalg.norm(compiled)  # the same direction
