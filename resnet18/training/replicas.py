"""Agreement across replicas and workers: the collectives the loop needs besides the gradient sum.

Every decision that changes what a process does next (save, stop, skip) must be
taken alike by every replica of every worker, or MultiWorkerMirroredStrategy
hangs in a collective one side never joins. Each helper here is one small
all-reduce (or all-gather) whose result is identical everywhere:

- `sync_moving_statistics`: Keras keeps batch-norm moving statistics per replica
  (aggregation NONE); they are pooled across all replicas before every evaluation
  and save, so evaluation, checkpoints and every worker's weights agree.
- `any_replica`: whether a flag (e.g. SIGTERM received) is set on any worker.
- `check_same_step`: every worker restored the same step (exact, min == max).
- `weights_are_finite`: no NaN/Inf in the model's weights.

    python -m pytest tests/test_replicas.py
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from resnet18.runtime.errors import SetupError


def batch_norm_statistics(models: list[keras.Model]) -> list[tuple[tf.Variable, tf.Variable]]:
    """(moving mean, moving variance) of every batch-norm layer of `models`."""
    return [(layer.moving_mean, layer.moving_variance)
            for model in models for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def make_statistics_sync(strategy: tf.distribute.Strategy, models: list[keras.Model]) -> Callable[[], None]:
    """A function that replaces every replica's BN moving statistics by their pooled values.

    The moving mean becomes the mean of the replicas' means; the moving variance the
    pooled variance: the mean of the variances plus the variance of the means (the
    variance of the union of the replicas' examples), not the plain mean of variances.
    """
    pairs = batch_norm_statistics(models)
    if strategy.num_replicas_in_sync == 1 or not pairs:
        return lambda: None

    @tf.function
    def sync() -> None:
        def replica_fn():
            context = tf.distribute.get_replica_context()
            values = []
            for mean, variance in pairs:
                mean_value = tf.cast(tf.identity(mean.value), tf.float32)
                values += [mean_value, tf.cast(tf.identity(variance.value), tf.float32), tf.square(mean_value)]
            pooled = context.all_reduce(tf.distribute.ReduceOp.MEAN, values)
            for index, (mean, variance) in enumerate(pairs):
                mean_of_means, mean_of_variances, mean_of_squares = pooled[3 * index:3 * index + 3]
                spread = tf.maximum(mean_of_squares - tf.square(mean_of_means), 0.0)
                mean.assign(tf.cast(mean_of_means, mean.dtype))
                variance.assign(tf.cast(mean_of_variances + spread, variance.dtype))
        strategy.run(replica_fn)

    return sync


def make_any_replica(strategy: tf.distribute.Strategy) -> Callable[[bool], bool]:
    """A function flag -> whether any replica of any worker passed True (one all-reduce)."""

    @tf.function
    def count(flag):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(flag)), axis=None)

    return lambda flag: float(count(tf.constant(1.0 if flag else 0.0))) > 0


def check_same_step(strategy: tf.distribute.Strategy, step: int, workdir: str) -> None:
    """Raises SetupError unless every worker is at `step` (exact: min and max over all replicas).

    Workers that restored different checkpoints would train different weights and
    disagree on every later decision.
    """
    values = _gather_all(strategy, float(step))
    low, high = min(values), max(values)
    if low != high:
        raise SetupError(
            f"workers found different checkpoints in {workdir} (steps {low:.0f} to {high:.0f}; this worker: "
            f"{step}); the work directory must be storage every worker sees (a shared volume or a bucket)")


def _gather_all(strategy: tf.distribute.Strategy, value: float) -> list[float]:
    """`value` of every replica of every worker (float64: steps are exact up to 2**53)."""
    local = tf.constant([value], tf.float64)

    @tf.function
    def gather():
        def replica_fn():
            return tf.distribute.get_replica_context().all_gather(tf.identity(local), axis=0)
        return strategy.experimental_local_results(strategy.run(replica_fn))[0]

    return [float(item) for item in gather().numpy()]


def make_finite_check(model: keras.Model) -> Callable[[], bool]:
    """A function -> whether every weight of `model` is finite (traced once)."""

    @tf.function(input_signature=[])
    def finite():
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(weight, tf.float32)))
                              for weight in model.weights])

    return lambda: bool(finite())
