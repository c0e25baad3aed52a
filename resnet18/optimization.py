"""The optimisation recipe: learning-rate schedule, optimizer, and one replica's train step.

`make_train_step` is the gradient step the loop runs on every replica (and the
throughput benchmark times): softmax cross-entropy on (smoothed) one-hot or soft
targets, averaged over the global batch; optional gradient accumulation
(`train.grad_accum_steps`: the same effective batch with 1/N of the activation
memory); optional XLA for the forward and backward pass (`train.xla`); weight
decay either as an L2 term (`weight_decay_mode: l2`) or decoupled in the
optimizer (`decoupled`), on conv and dense kernels only.

    python -m launcher --job jobs/cifar10_fast.yaml --dry_run   # prints the resolved recipe
"""

from __future__ import annotations

import math
from typing import Callable

import keras
import tensorflow as tf

from resnet18.config import Config
from resnet18.ema import WeightAverage
from resnet18.model import decayed_kernels


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak`, then cosine decay to 0 or constant, times `scale`.

    `scale` is a variable the loop lowers on a validation-loss plateau
    (`lr_schedule: plateau`); it stays 1 for the other schedules.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: str = "cosine"):
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
        rate = self.peak * tf.minimum(1.0, (step + 1.0) / warmup) if self.warmup_steps else tf.constant(self.peak)
        if self.decay == "cosine":
            decay_steps = tf.cast(max(self.total_steps - self.warmup_steps, 1), tf.float32)
            progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
            rate = tf.where(step < self.warmup_steps, rate, self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress)))
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
        decay="cosine" if train.lr_schedule == "cosine" else "constant",
    )


def make_optimizer(
    config: Config, schedule: WarmupDecay, precision: str = "float32", model: keras.Model | None = None
) -> keras.optimizers.Optimizer:
    """The optimizer following `schedule`; float16 gets dynamic loss scaling.

    With `weight_decay_mode: decoupled`, `model` is required: its kernels are
    decayed by the optimizer (w -= lr * weight_decay * w), BN and biases are not.
    """
    train = config.train
    decoupled = train.weight_decay if train.weight_decay_mode == "decoupled" else None
    if train.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=train.momentum, nesterov=True,
                                         weight_decay=decoupled)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=schedule, weight_decay=decoupled)
    if decoupled:
        if model is None:
            raise ValueError("weight_decay_mode decoupled needs the model to tell kernels from BN and biases")
        kernels = {id(kernel) for kernel in decayed_kernels(model)}
        optimizer.exclude_from_weight_decay(
            var_list=[variable for variable in model.trainable_variables if id(variable) not in kernels])
    if precision == "float16":
        optimizer = AgreedLossScaleOptimizer(optimizer)
    return optimizer


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


def make_train_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, config: Config, num_classes: int,
    weight_average: WeightAverage | None = None,
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """One replica's training step: (images, labels) -> (loss, correct predictions).

    `labels` are class ids [batch] or soft targets [batch, classes] (CutMix). The loss
    is averaged over the *global* batch (`compute_average_loss`), so the gradients the
    optimizer sums across replicas are those of the global batch. With
    `grad_accum_steps` N the replica's batch runs as N sequential micro-batches whose
    gradients are summed before one update: the same gradient (without batch norm,
    whose statistics see micro-batches), 1/N of the activation memory.
    """
    train = config.train
    smoothing = train.label_smoothing
    l2_decay = train.weight_decay if train.weight_decay_mode == "l2" else 0.0
    global_batch = train.global_batch_size
    accumulation = train.grad_accum_steps
    kernels = decayed_kernels(model)
    variables = model.trainable_variables

    def loss_and_gradients(images, targets):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            smoothed = targets * (1.0 - smoothing) + smoothing / num_classes
            per_example = tf.nn.softmax_cross_entropy_with_logits(smoothed, tf.cast(logits, tf.float32))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if l2_decay:
                l2 = tf.add_n([tf.nn.l2_loss(tf.cast(kernel, tf.float32)) for kernel in kernels])
                # Split over micro-batches so the step adds it exactly once.
                loss += tf.nn.scale_regularization_loss(l2_decay * l2) / accumulation
            scaled = optimizer.scale_loss(loss)  # loss scaling for float16; identity otherwise
        gradients = tape.gradient(scaled, variables)
        predictions = tf.argmax(logits, -1, output_type=tf.int32)
        correct = tf.reduce_sum(tf.cast(tf.equal(predictions, tf.argmax(targets, -1, output_type=tf.int32)),
                                        tf.float32))
        return loss, gradients, correct

    if train.xla:
        # The forward and backward pass only: the update's cross-replica all-reduce stays outside XLA,
        # so it runs under one device and the mirrored strategies (not with synchronized BN, whose
        # all-reduce would be inside: config refuses that; train.py drops xla on TPUs, compiled anyway).
        loss_and_gradients = tf.function(loss_and_gradients, jit_compile=True)

    def train_step(images, labels):
        targets = labels if labels.shape.rank == 2 else tf.one_hot(labels, num_classes)
        if accumulation == 1:
            loss, gradients, correct = loss_and_gradients(images, targets)
        else:
            # Unrolled, not a tf.while_loop: synchronized batch norm all-reduces inside the pass,
            # which MirroredStrategy cannot do inside control flow. Each micro-batch waits for the
            # previous one's gradients, so only one micro-batch's activations are alive at a time.
            micro_images = tf.split(images, accumulation)
            micro_targets = tf.split(targets, accumulation)
            loss, correct, gradients = 0.0, 0.0, None
            for micro_batch, micro_target in zip(micro_images, micro_targets):
                with tf.control_dependencies(gradients or []):
                    micro_batch = tf.identity(micro_batch)
                micro_loss, micro_gradients, micro_correct = loss_and_gradients(micro_batch, micro_target)
                loss += micro_loss
                correct += micro_correct
                gradients = micro_gradients if gradients is None else [
                    total + part for total, part in zip(gradients, micro_gradients)]
        optimizer.apply_gradients(zip(gradients, variables))
        if weight_average is not None:  # after the update: the average follows the new weights
            weight_average.update(optimizer.iterations)
        return loss, correct

    return train_step
