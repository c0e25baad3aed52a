"""The training state: model, optimizer, global step and weight average, and its checkpoint.

Everything here creates variables, so `build_train_state` runs inside the
strategy scope. The checkpoint is built from the state and only from it, so
what is saved and what is restored can never drift apart.

    python -c "import resnet18.state as s; help(s.build_train_state)"
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from resnet18.config import Config
from resnet18.ema import WeightAverage
from resnet18.model import build_model
from resnet18.optimization import WarmupDecay, make_optimizer, make_schedule


@dataclasses.dataclass
class TrainState:
    """What training changes, step by step."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    schedule: WarmupDecay  # its plateau scale is recomputed from the history, not saved
    step: tf.Variable  # the global step (optimizer.iterations skips steps a float16 overflow skipped)
    average: WeightAverage | None  # exponential moving average of the weights, if train.ema_decay > 0

    @property
    def evaluated_model(self) -> keras.Model:
        """What evaluation, the best checkpoint and the exports use: the average if there is one."""
        return self.average.model if self.average else self.model

    def checkpoint(self, with_average: bool = True) -> tf.train.Checkpoint:
        """The checkpoint of this state (without the average: to restore checkpoints that have none)."""
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step)
        if self.average and with_average:
            checkpoint.ema_model = self.average.model
        return checkpoint


def build_train_state(config: Config, strategy: tf.distribute.Strategy, num_classes: int, precision: str,
                      steps_per_epoch: int) -> TrainState:
    """A fresh state at step 0, its variables created in `strategy`'s scope."""
    with strategy.scope():
        model = build_model(config, num_classes, precision)
        schedule = make_schedule(config, steps_per_epoch)
        optimizer = make_optimizer(config, schedule, precision, model)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        average = None
        if config.train.ema_decay:  # same seed: the average starts equal to the model
            average = WeightAverage(model, build_model(config, num_classes, precision), config.train.ema_decay)
    return TrainState(model, optimizer, schedule, step, average)
