"""One replica's train step, and the compiled function that runs several of them per call.

`make_train_step` is the gradient step the loop runs on every replica (and the
throughput benchmark times): the task's objective averaged over the global batch,
weight decay as an L2 term where the optimizer does not apply it, optional gradient
accumulation (`train.grad_accum_steps`: the same effective batch with 1/N of the
activation memory), optional XLA for the forward and backward pass (`train.xla`), then
the update and the weight average. `make_train_calls` runs `steps` of them per call
(host overhead) and returns the summed loss and correct count.

    python -m pytest tests/test_optimization.py
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from resnet18.autograph import as_written, converted
from resnet18.config import Config
from resnet18.data.pipeline import static_batch
from resnet18.models import decayed_kernels
from resnet18.tasks.task import Objective
from resnet18.training.ema import WeightAverage
from resnet18.training.optimizers import l2_weight_decay


def make_train_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, objective: Objective, config: Config,
    num_classes: int, weight_average: WeightAverage | None = None,
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """One replica's training step: (images, labels) -> (loss, correct predictions).

    `labels` are class ids [batch] or soft targets [batch, classes] (CutMix). The loss
    is averaged over the *global* batch (`compute_average_loss`), so the gradients the
    optimizer sums across replicas are those of the global batch. With
    `grad_accum_steps` N the replica's batch runs as N sequential micro-batches whose
    gradients are summed before one update: the same gradient (without batch norm,
    whose statistics see micro-batches), 1/N of the activation memory. The objective is the
    task's (tasks/task.py): (images, targets) -> (per-example loss, correct, global examples).
    """
    train = config.train
    l2_decay = l2_weight_decay(config)
    accumulation = train.grad_accum_steps
    kernels = decayed_kernels(model)
    variables = model.trainable_variables
    objective = converted(objective)  # the task's: AutoGraph's, as in any tf.function

    def loss_and_gradients(images, targets):
        with tf.GradientTape() as tape:
            per_example, correct, global_examples = objective(images, targets)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_examples)
            if l2_decay:
                l2 = tf.add_n([tf.nn.l2_loss(tf.cast(kernel, tf.float32)) for kernel in kernels])
                # Split over micro-batches so the step adds it exactly once.
                loss += tf.nn.scale_regularization_loss(l2_decay * l2) / accumulation
            scaled = optimizer.scale_loss(loss)  # loss scaling for float16; identity otherwise
        return loss, tape.gradient(scaled, variables), correct

    if train.xla:
        # The forward and backward pass only: the update's cross-replica all-reduce stays outside XLA,
        # so it runs under one device and the mirrored strategies (not with synchronized BN or SimCLR,
        # whose collectives would be inside: config and the task refuse that; the loop drops xla on TPUs).
        loss_and_gradients = tf.function(loss_and_gradients, jit_compile=True)

    def train_step(images, labels):
        targets = labels if labels.shape.rank == 2 else tf.one_hot(labels, num_classes)
        if accumulation == 1:
            loss, gradients, correct = loss_and_gradients(images, targets)
        else:
            # Unrolled, not a tf.while_loop: synchronized batch norm all-reduces inside the pass,
            # which MirroredStrategy cannot do inside control flow. Each micro-batch waits for the
            # previous one's gradients, so only one micro-batch's activations are alive at a time.
            loss, correct, gradients = 0.0, 0.0, None
            for micro_batch, micro_target in zip(tf.split(images, accumulation), tf.split(targets, accumulation)):
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


def make_train_calls(strategy: tf.distribute.Strategy, train_step: Callable, global_batch_size: int) -> Callable:
    """A compiled function (iterator, steps) -> (loss sum, correct sum) over `steps` train steps."""

    @as_written  # and so is everything it calls but the task's objective (resnet18/autograph.py)
    def pinned_step(*batch):  # the same graph on every layout (pipeline.static_batch)
        return train_step(*static_batch(global_batch_size, *batch))

    @tf.function
    def train_calls(iterator, num_steps):
        loss_sum = tf.constant(0.0)
        correct_sum = tf.constant(0.0)
        for _ in tf.range(num_steps):
            loss, correct = strategy.run(pinned_step, args=next(iterator))
            loss_sum += strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
            correct_sum += strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)
        return loss_sum, correct_sum

    return train_calls
