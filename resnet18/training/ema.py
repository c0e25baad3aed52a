"""Exponential moving average (EMA) of the model's weights, kept in a twin model.

The twin has the trained model's architecture; after every step each of its
weights (kernels and batch-norm statistics alike) moves towards the trained
one: average = d * average + (1 - d) * weight, with d warmed up as
min(decay, (1 + t) / (10 + t)) so early averages are not dominated by the
random initialisation. Evaluation, the best checkpoint and the exports use the
twin; being a whole model it needs no weight swapping.

The update runs in replica context, inside the train step: Keras variables have
aggregation NONE, so each replica's assign updates only its own copy (as batch
norm updates its moving statistics) - no merge_call, no cross-device traffic, and
on a TPU it is part of the compiled step.

    python -m launcher --job jobs/cifar10_fast.yaml --set train.ema_decay=0.99
"""

from __future__ import annotations

import keras
import tensorflow as tf


class WeightAverage:
    """Keeps `average_model`'s weights an EMA of `model`'s; create both in the strategy scope."""

    def __init__(self, model: keras.Model, average_model: keras.Model, decay: float):
        if len(model.weights) != len(average_model.weights):
            raise ValueError("the average model must have the trained model's architecture")
        self.decay = decay
        self.pairs = list(zip(average_model.weights, model.weights))
        self.model = average_model

    def update(self, step: tf.Tensor | tf.Variable) -> None:
        """One EMA step, in replica context (the train step; eagerly, the default strategy's)."""
        step = tf.cast(step, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + step) / (10.0 + step))
        for average, weight in self.pairs:
            average.assign(average * tf.cast(decay, average.dtype)
                           + tf.cast(weight, average.dtype) * tf.cast(1.0 - decay, average.dtype))

    def copy_weights(self) -> None:
        """Starts the average at the model's current weights (a run that turned the average on late)."""
        for average, weight in self.pairs:
            average.assign(weight)
