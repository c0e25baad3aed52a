"""Agreement across replicas: pooled batch-norm statistics, any-replica flags, the finite check."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from launcher.strategy import make_strategy
from resnet18.training import replicas
from resnet18.config import RuntimeConfig


def bn_model() -> keras.Model:
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.BatchNormalization(name="bn_a")(inputs)
    x = keras.layers.Conv2D(5, 1, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn_b")(x)
    return keras.Model(inputs, x)


def per_replica_values(variable) -> list[np.ndarray]:
    return [np.asarray(value.numpy()) for value in variable.value.values]


def test_moving_statistics_are_pooled_as_the_variance_of_the_union(two_replicas):
    strategy = two_replicas
    with strategy.scope():
        model = bn_model()
    rng = np.random.default_rng(0)
    means = {layer.name: rng.normal(0, 2, (2, layer.moving_mean.shape[0])).astype(np.float32)
             for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}
    variances = {name: rng.uniform(0.1, 3, value.shape).astype(np.float32) for name, value in means.items()}

    @tf.function
    def set_per_replica():
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.moving_mean.assign(tf.gather(tf.constant(means[layer.name]), replica))
                    layer.moving_variance.assign(tf.gather(tf.constant(variances[layer.name]), replica))
        strategy.run(replica_fn)

    set_per_replica()
    layer = model.get_layer("bn_b")
    assert not np.array_equal(*per_replica_values(layer.moving_mean))  # the replicas really differ
    replicas.make_statistics_sync(strategy, [model])()
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        mean, variance = means[layer.name], variances[layer.name]
        # The union of two equal-sized groups: mean of means; mean of variances + variance of the means.
        expected_mean = mean.mean(axis=0)
        expected_variance = variance.mean(axis=0) + mean.var(axis=0)
        for value in per_replica_values(layer.moving_mean):  # float32 sums of 2 terms: a few ulps
            np.testing.assert_allclose(value, expected_mean, rtol=1e-6, atol=1e-6)
        for value in per_replica_values(layer.moving_variance):
            np.testing.assert_allclose(value, expected_variance, rtol=1e-5, atol=1e-6)
        assert np.all(expected_variance > variance.mean(axis=0))  # the plain mean would be too small


def test_any_replica_and_the_finite_check():
    strategy = make_strategy(RuntimeConfig(strategy="one_device"))
    any_replica = replicas.make_any_replica(strategy)
    assert any_replica(True) and not any_replica(False)
    model = bn_model()
    finite = replicas.make_finite_check(model)
    assert finite()
    model.get_layer("conv").kernel.assign(tf.fill(model.get_layer("conv").kernel.shape, np.nan))
    assert not finite()


def test_two_replicas_take_the_steps_of_one_on_the_same_global_batch(two_replicas):
    # Without batch norm a step is a function of the global batch alone: loss averaged over the
    # global batch on each replica, gradients summed across replicas. The only difference is the
    # order of float32 sums (two partial sums of 32 examples instead of one of 64), a few ulps per
    # step: after 5 steps of SGD the weights agree to 1e-5 relative (3e-6 measured on this model).
    from resnet18.config import Config, TrainConfig
    from tests.helpers_tiny_model import replicated_steps, small_model

    config = Config(train=TrainConfig(global_batch_size=64, warmup_epochs=0, lr_schedule="constant",
                                      learning_rate=0.4))
    images = tf.random.stateless_uniform([64, 8, 8, 3], [1, 2], 0, 1)
    labels = tf.random.stateless_uniform([64], [3, 4], 0, 10, tf.int32)
    one = replicated_steps(make_strategy(RuntimeConfig(strategy="one_device")), config, images, labels, 5,
                           lambda: small_model(seed=3))
    two = replicated_steps(two_replicas, config, images, labels, 5, lambda: small_model(seed=3))
    start = [weight.numpy() for weight in small_model(seed=3).weights]
    for single, double, initial in zip(one, two, start):
        assert not np.allclose(single, initial)  # the steps moved the weights
        np.testing.assert_allclose(double, single, rtol=1e-5, atol=1e-6)
