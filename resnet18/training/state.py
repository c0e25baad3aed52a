"""The training state: network, optimizer, global step and weight average, and its checkpoint.

Everything here creates variables, so `build_train_state` runs inside the strategy
scope. The checkpoint is built from the state and only from it, so what is saved
and what is restored can never drift apart. Its layout does not depend on the
precision: the optimizer is saved as itself, and float16's dynamic loss scale beside
it as `loss_scale`, so a run may resume in another precision (another machine, where
`train.precision: auto` resolves differently) and keep its optimizer state.

    python -c "import resnet18.training.state as s; help(s.build_train_state)"
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from resnet18.config import Config
from resnet18.tasks.task import Task
from resnet18.training.ema import WeightAverage
from resnet18.training.optimizers import make_optimizer
from resnet18.training.schedules import WarmupDecay, make_schedule


@dataclasses.dataclass
class TrainState:
    """What training changes, step by step."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer  # float16: a loss-scale optimizer around the real one
    schedule: WarmupDecay  # its plateau scale is recomputed from the history, not saved
    step: tf.Variable  # the global step (optimizer.iterations skips steps a float16 overflow skipped)
    average: WeightAverage | None  # exponential moving average of the weights, if train.ema_decay > 0

    @property
    def evaluated_model(self) -> keras.Model:
        """What evaluation, the best checkpoint and the exports use: the average if there is one."""
        return self.average.model if self.average else self.model

    @property
    def loss_scaled(self) -> bool:
        return isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)

    def checkpoint(self, with_average: bool = True, with_loss_scale: bool = True) -> tf.train.Checkpoint:
        """The checkpoint of this state (without the average or the loss scale: to restore checkpoints that have
        none)."""
        inner = self.optimizer.inner_optimizer if self.loss_scaled else self.optimizer
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=inner, step=self.step)
        if self.average and with_average:
            checkpoint.ema_model = self.average.model
        if self.loss_scaled and with_loss_scale:
            checkpoint.loss_scale = self.optimizer
        return checkpoint


def build_train_state(config: Config, strategy: tf.distribute.Strategy, task: Task, num_classes: int,
                      precision: str, steps_per_epoch: int) -> TrainState:
    """A fresh state at step 0 (the seed's weights), its variables created in `strategy`'s scope."""
    with strategy.scope():
        model = task.build_network(config, num_classes, precision)
        schedule = make_schedule(config, steps_per_epoch)
        optimizer = make_optimizer(config, schedule, precision, model)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        average = None
        if config.train.ema_decay:  # the average starts equal to the model (same seed; then copied)
            average = WeightAverage(model, task.build_network(config, num_classes, precision), config.train.ema_decay)
            average.copy_weights()
    return TrainState(model, optimizer, schedule, step, average)
