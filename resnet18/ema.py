"""Exponential moving average (EMA) of the model's weights, kept in a twin model.

The twin has the trained model's architecture; after every step each of its
weights (kernels and batch-norm statistics alike) moves towards the trained
one: average = d * average + (1 - d) * weight, with d warmed up as
min(decay, (1 + t) / (10 + t)) so early averages are not dominated by the
random initialisation. Evaluation, the best checkpoint and the exports use the
twin; being a whole model it needs no weight swapping, and each replica updates
its own copy on its own device (no cross-device traffic).

    python -m launcher --job jobs/cifar10_fast.yaml    # train.ema_decay: 0.999
"""

from __future__ import annotations

import keras
import tensorflow as tf


class WeightAverage:
    """Keeps `average_model`'s weights an EMA of `model`'s; create both in the strategy scope."""

    def __init__(self, model: keras.Model, average_model: keras.Model, decay: float,
                 strategy: tf.distribute.Strategy):
        if len(model.weights) != len(average_model.weights):
            raise ValueError("the average model must have the trained model's architecture")
        self.decay = decay
        self.strategy = strategy
        self.pairs = [(_tf_variable(average), _tf_variable(weight))
                      for average, weight in zip(average_model.weights, model.weights)]
        self.model = average_model

    def update_from_replica(self, step: tf.Variable) -> None:
        """One EMA step, called inside `strategy.run` after the optimizer's update.

        merge_call hands it to cross-replica context once per step, the way Keras
        optimizers update variables: on a TPU it stays inside the compiled step.
        """
        # `step` is a variable, read in cross-replica context: a replica's tensor must not cross over.
        tf.distribute.get_replica_context().merge_call(lambda _: self.update(step))

    def update(self, step: tf.Tensor | tf.Variable) -> None:
        """One EMA step, in cross-replica context."""
        step = tf.cast(step, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + step) / (10.0 + step))

        def move(average, weight):
            return average.assign(average * tf.cast(decay, average.dtype)
                                  + tf.cast(weight, average.dtype) * tf.cast(1.0 - decay, average.dtype))

        for average, weight in self.pairs:
            # Runs on every device with that device's copies of both variables.
            self.strategy.extended.update(average, move, args=(weight,))


def _tf_variable(variable):
    """The tf.Variable (distributed under a strategy) behind a Keras 3 variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable
