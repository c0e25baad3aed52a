"""Learning-rate schedules: linear warm-up, then the decay `train.lr_schedule` names, times a plateau scale.

    cosine    half a cosine from the peak to 0 over the steps after warm-up
    constant  the peak
    plateau   the peak, lowered by the loop on a test-loss plateau (Keras ReduceLROnPlateau,
              training/epoch_rules.py) through the schedule's `scale` variable

A new schedule is a function of the progress after warm-up (0 to 1) returning the
fraction of the peak rate, and one line in SCHEDULES (and its name in config.Schedule).

    python -m launcher --job jobs/cifar10_fast.yaml --dry_run   # prints the resolved recipe
"""

from __future__ import annotations

import math
from typing import Callable

import keras
import tensorflow as tf

from resnet18.config import Config
from resnet18.registry import lookup


def cosine(progress: tf.Tensor) -> tf.Tensor:
    return 0.5 * (1.0 + tf.cos(math.pi * progress))


def constant(progress: tf.Tensor) -> tf.Tensor:
    return tf.ones_like(progress)


# train.lr_schedule -> the fraction of the peak rate at a progress (0 to 1) after warm-up.
SCHEDULES: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "cosine": cosine,
    "constant": constant,
    "plateau": constant,  # the epoch rules set WarmupDecay.scale
}


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak`, then `peak` x decay(progress), times `scale`.

    `scale` is a variable the loop lowers on a validation-loss plateau
    (`lr_schedule: plateau`); it stays 1 for the other schedules.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int,
                 decay: Callable[[tf.Tensor], tf.Tensor] = cosine):
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay = decay
        # Not saved in checkpoints: the loop recomputes it from history.jsonl on resume.
        self.scale = tf.Variable(1.0, trainable=False, name="lr_plateau_scale",
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(max(self.warmup_steps, 1), tf.float32)
        warming = self.peak * tf.minimum(1.0, (step + 1.0) / warmup)
        decay_steps = tf.cast(max(self.total_steps - self.warmup_steps, 1), tf.float32)
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        rate = self.peak * self.decay(progress)
        if self.warmup_steps:
            rate = tf.where(step < self.warmup_steps, warming, rate)
        return rate * tf.cast(self.scale, tf.float32)


def peak_learning_rate(config: Config) -> float:
    """train.learning_rate, scaled linearly by global batch / 256 unless lr_scaling is none."""
    train = config.train
    if train.lr_scaling == "linear":
        return train.learning_rate * train.global_batch_size / 256.0
    return train.learning_rate


def make_schedule(config: Config, steps_per_epoch: int) -> WarmupDecay:
    """The learning-rate schedule of train.* (create it in the strategy scope: it holds a variable)."""
    train = config.train
    return WarmupDecay(
        peak=peak_learning_rate(config),
        warmup_steps=int(round(train.warmup_epochs * steps_per_epoch)),
        total_steps=train.epochs * steps_per_epoch,
        decay=lookup(SCHEDULES, train.lr_schedule, "train.lr_schedule"),
    )
