"""Optimizers: one registry (`train.optimizer`), LARS, and loss scaling that every replica agrees on.

    sgd   SGD with Nesterov momentum (train.momentum)
    adam  Adam
    lars  LARS (SimCLR's large-batch optimizer): per-layer trust ratio, weight decay inside its
          update, batch norm and biases excluded

Weight decay (`train.weight_decay`, on conv and dense kernels only) is either a loss term
(`weight_decay_mode: l2`, added by the train step) or decoupled in the optimizer (`decoupled`:
w -= lr x decay x w); an optimizer that decays weights itself (LARS) takes neither. float16
wraps the optimizer in dynamic loss scaling. A new optimizer is a function (train config,
schedule, decoupled decay or None) -> optimizer and one line in OPTIMIZERS (and its name in
config.Optimizer).

    python -m launcher --job jobs/simclr_pretrain.yaml --dry_run
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras
import tensorflow as tf

from resnet18.config import Config, TrainConfig
from resnet18.models import decayed_kernels
from resnet18.registry import lookup
from resnet18.training.schedules import WarmupDecay


@dataclasses.dataclass(frozen=True)
class OptimizerKind:
    """How to build one kind of optimizer, and whether it applies weight decay itself."""

    build: Callable[[TrainConfig, WarmupDecay, float | None], keras.optimizers.Optimizer]
    decays_weights_itself: bool = False  # train.weight_decay_mode does not apply (LARS)


def _sgd(train: TrainConfig, schedule: WarmupDecay, decoupled: float | None) -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(learning_rate=schedule, momentum=train.momentum, nesterov=True,
                                weight_decay=decoupled)


def _adam(train: TrainConfig, schedule: WarmupDecay, decoupled: float | None) -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(learning_rate=schedule, weight_decay=decoupled)


def _lars(train: TrainConfig, schedule: WarmupDecay, decoupled: float | None) -> keras.optimizers.Optimizer:
    return LARS(learning_rate=schedule, momentum=train.momentum, weight_decay=train.weight_decay)


OPTIMIZERS: dict[str, OptimizerKind] = {
    "sgd": OptimizerKind(_sgd),
    "adam": OptimizerKind(_adam),
    "lars": OptimizerKind(_lars, decays_weights_itself=True),
}


def l2_weight_decay(config: Config) -> float:
    """The weight decay the train step adds to the loss as an L2 term (0 when the optimizer applies it)."""
    train = config.train
    kind = lookup(OPTIMIZERS, train.optimizer, "train.optimizer")
    return train.weight_decay if train.weight_decay_mode == "l2" and not kind.decays_weights_itself else 0.0


def make_optimizer(
    config: Config, schedule: WarmupDecay, precision: str = "float32", model: keras.Model | None = None
) -> keras.optimizers.Optimizer:
    """The optimizer following `schedule`; float16 gets dynamic loss scaling.

    With `weight_decay_mode: decoupled`, `model` is required: its kernels are
    decayed by the optimizer (w -= lr * weight_decay * w), BN and biases are not.
    """
    train = config.train
    kind = lookup(OPTIMIZERS, train.optimizer, "train.optimizer")
    decoupled = train.weight_decay if train.weight_decay_mode == "decoupled" and not kind.decays_weights_itself \
        else None
    optimizer = kind.build(train, schedule, decoupled)
    if decoupled:
        if model is None:
            raise ValueError("weight_decay_mode decoupled needs the model to tell kernels from BN and biases")
        kernels = {id(kernel) for kernel in decayed_kernels(model)}
        optimizer.exclude_from_weight_decay(
            var_list=[variable for variable in model.trainable_variables if id(variable) not in kernels])
    if precision == "float16":
        optimizer = AgreedLossScaleOptimizer(optimizer)
    return optimizer


class LARS(keras.optimizers.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017), as the SimCLR reference uses it.

    For every weight but batch-norm parameters and biases: g += weight_decay x w, then the
    rate is scaled by trust x ||w|| / ||g|| (1 when either norm is 0); momentum as
    v = momentum x v + rate x g, w -= v. Batch norm and biases take the plain rate and no decay.
    SimCLR trains with batches of thousands, where plain SGD's linear rate scaling breaks down.
    """

    def __init__(self, learning_rate, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, name: str = "lars", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum
        self.decay = weight_decay
        self.trust_coefficient = trust_coefficient

    @staticmethod
    def adapts(variable) -> bool:
        """Whether LARS adapts (and decays) this weight: not batch norm's gamma/beta, not biases."""
        path = getattr(variable, "path", variable.name)
        return not any(part in path for part in ("/gamma", "/beta", "/bias"))

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.velocities = [self.add_variable_from_reference(variable, "velocity") for variable in var_list]
        self.adapted = [self.adapts(variable) for variable in var_list]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        if self.adapted[index]:
            gradient = gradient + self.decay * variable
            weight_norm, gradient_norm = tf.norm(variable), tf.norm(gradient)
            trust = tf.where((weight_norm > 0) & (gradient_norm > 0),
                             self.trust_coefficient * weight_norm / gradient_norm, 1.0)
            rate = rate * tf.cast(trust, variable.dtype)
        velocity = self.velocities[index]
        self.assign(velocity, self.momentum * velocity + rate * gradient)
        self.assign_sub(variable, velocity)


class AgreedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Dynamic loss scaling whose skip-or-apply decision is taken alike by every replica and worker.

    Keras 3 checks the gradients for Inf/NaN per replica, before the cross-replica sum:
    under MirroredStrategy it takes the first replica's answer (an overflow on another
    replica is then applied, and the weights become NaN); under MultiWorkerMirroredStrategy
    each replica decides for itself (replicas take different branches and the collectives
    inside hang). Here each replica's answer is all-reduced first, so a step is skipped
    everywhere, and the loss scale halved everywhere, when any replica overflowed.
    """

    def check_finite(self, grads):
        finite = super().check_finite(grads)
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return finite
        overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
        return tf.equal(overflowed, 0.0)
