"""The weight average follows its formula, warm-up included."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from resnet18.training.ema import WeightAverage
from tests.helpers_tiny_model import small_model


def test_weight_average_follows_its_formula_with_warm_up():
    model, average_model = small_model(seed=3, batch_norm=True), small_model(seed=4, batch_norm=True)
    average = WeightAverage(model, average_model, decay=0.9)
    before = [weight.numpy() for weight in average_model.weights]
    current = [weight.numpy() for weight in model.weights]
    average.update(tf.constant(0))  # warm-up: decay min(0.9, 1/10) = 0.1
    for start, weight, result in zip(before, current, average_model.weights):
        np.testing.assert_allclose(result.numpy(), 0.1 * start + 0.9 * weight, rtol=1e-6, atol=1e-7)
    middle = [weight.numpy() for weight in average_model.weights]
    average.update(tf.constant(10_000))
    for start, weight, result in zip(middle, current, average_model.weights):
        np.testing.assert_allclose(result.numpy(), 0.9 * start + 0.1 * weight, rtol=1e-6, atol=1e-7)
