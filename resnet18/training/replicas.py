"""Agreement across replicas and workers: the collectives the loop needs besides the gradient sum.

Every decision that changes what a process does next (save, stop, skip) must be
taken alike by every replica of every worker, or MultiWorkerMirroredStrategy
hangs in a collective one side never joins. Each helper here is one small
all-reduce (or all-gather) whose result is identical everywhere:

- `BatchNormStatistics`: Keras keeps batch-norm moving statistics per replica
  (aggregation NONE); they are pooled across all replicas before every evaluation
  and scheduled save, so evaluation, checkpoints and every worker's weights agree,
  and captured replica by replica where a save is not scheduled (a preemption).
- `any_replica`: whether a flag (e.g. SIGTERM received) is set on any worker.
- `check_same_step`: every worker restored the same step (exact, min == max).
- `weights_are_finite`: no NaN/Inf in the model's weights.

Their loops are Python loops over variables: each is traced as written (`autograph=False`,
resnet18/autograph.py says why).

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


class BatchNormStatistics:
    """The batch-norm moving statistics of `models`, which Keras keeps per replica (aggregation NONE).

    - `pool()` replaces every replica's statistics by their pooled values: the moving mean by the
      mean of the replicas' means; the moving variance by the mean of the variances plus the
      variance of the means (the variance of the union of the replicas' examples), not the plain
      mean of variances. Before every evaluation and every scheduled save, so evaluation,
      checkpoints and every worker's weights agree.
    - `capture()` gathers every replica's own statistics into checkpoint-only variables of shape
      [replicas, ...] (`trackable`), and `release()` gives each replica back its own row: a save
      at a step the uninterrupted run does not save at (a preemption) keeps the replicas' unpooled
      statistics, so the resumed run goes on exactly as the uninterrupted one.

    With one replica, or no batch norm, every method does nothing and `trackable` is None.
    """

    def __init__(self, strategy: tf.distribute.Strategy, models: list[keras.Model]):
        self.pairs = batch_norm_statistics(models)
        self.replicas = strategy.num_replicas_in_sync
        self.trackable: tf.train.Checkpoint | None = None
        self.pool = self.capture = self.release = lambda: None
        if self.replicas == 1 or not self.pairs:
            return
        variables = [variable for pair in self.pairs for variable in pair]
        with strategy.scope():
            self.rows = [tf.Variable(tf.zeros([self.replicas, *variable.shape], tf.float32), trainable=False,
                                     name=f"replica_statistics_{index}", aggregation=tf.VariableAggregation.NONE)
                         for index, variable in enumerate(variables)]
        self.trackable = tf.train.Checkpoint(rows=self.rows)
        self.pool = _pooling(strategy, self.pairs)
        self.capture, self.release = _capturing(strategy, variables, self.rows)


def _pooling(strategy: tf.distribute.Strategy, pairs: list[tuple[tf.Variable, tf.Variable]]) -> Callable[[], None]:
    @tf.function(autograph=False)
    def pool() -> None:
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

    return pool


def _capturing(strategy: tf.distribute.Strategy, variables: list[tf.Variable], rows: list[tf.Variable]
               ) -> tuple[Callable[[], None], Callable[[], None]]:
    @tf.function(autograph=False)
    def capture() -> None:
        def replica_fn():
            context = tf.distribute.get_replica_context()
            gathered = context.all_gather([tf.cast(tf.identity(variable.value), tf.float32)[None]
                                           for variable in variables], axis=0)
            for row, values in zip(rows, gathered):
                row.assign(values)
        strategy.run(replica_fn)

    @tf.function(autograph=False)
    def release() -> None:
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            for variable, row in zip(variables, rows):
                variable.assign(tf.cast(tf.gather(row.read_value(), replica), variable.dtype))
        strategy.run(replica_fn)

    return capture, release


def make_statistics_sync(strategy: tf.distribute.Strategy, models: list[keras.Model]) -> Callable[[], None]:
    """BatchNormStatistics(strategy, models).pool: pools every replica's BN moving statistics."""
    return BatchNormStatistics(strategy, models).pool


def make_any_replica(strategy: tf.distribute.Strategy) -> Callable[[bool], bool]:
    """A function flag -> whether any replica of any worker passed True (one all-reduce)."""

    @tf.function(autograph=False)
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

    @tf.function(autograph=False)
    def gather():
        def replica_fn():
            return tf.distribute.get_replica_context().all_gather(tf.identity(local), axis=0)
        return strategy.experimental_local_results(strategy.run(replica_fn))[0]

    return [float(item) for item in gather().numpy()]


def make_finite_check(model: keras.Model) -> Callable[[], bool]:
    """A function -> whether every weight of `model` is finite (traced once)."""

    @tf.function(input_signature=[], autograph=False)
    def finite():
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(weight, tf.float32)))
                              for weight in model.weights])

    return lambda: bool(finite())
