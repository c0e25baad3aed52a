"""The training state: model, optimizer, global step and weight average, and its checkpoint.

Everything here creates variables, so `build_train_state` runs inside the
strategy scope. The checkpoint is built from the state and only from it, so
what is saved and what is restored can never drift apart.

    python -c "import resnet18.training.state as s; help(s.build_train_state)"
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from resnet18.config import Config
from resnet18.training.ema import WeightAverage
from resnet18.models.resnet import build_model
from resnet18.training.optimizers import WarmupDecay, make_optimizer, make_schedule


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


def build_network(config: Config, num_classes: int, precision: str = "float32") -> keras.Model:
    """The network a run trains: the classifier, or for SimCLR the encoder with its projection head.

    With model.freeze_encoder only the classifier ("logits") trains; the frozen batch norms run in
    inference mode (Keras does so for non-trainable BatchNormalization).
    """
    if config.train.task == "simclr":
        from resnet18.tasks.simclr import build_simclr_model

        return build_simclr_model(config, num_classes, precision)
    model = build_model(config, num_classes, precision)
    if config.model.freeze_encoder:
        for layer in model.layers:
            layer.trainable = layer.name == "logits"
    return model


def build_train_state(config: Config, strategy: tf.distribute.Strategy, num_classes: int, precision: str,
                      steps_per_epoch: int) -> TrainState:
    """A fresh state at step 0, its variables created in `strategy`'s scope (train.init_from applied)."""
    with strategy.scope():
        model = build_network(config, num_classes, precision)
        if config.train.init_from:
            from resnet18.training.weights import initialize_from

            initialize_from(model, config, num_classes)
        schedule = make_schedule(config, steps_per_epoch)
        optimizer = make_optimizer(config, schedule, precision, model)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        average = None
        if config.train.ema_decay:  # the average starts equal to the model (same seed; then copied)
            average = WeightAverage(model, build_network(config, num_classes, precision), config.train.ema_decay)
            average.copy_weights()
    return TrainState(model, optimizer, schedule, step, average)
