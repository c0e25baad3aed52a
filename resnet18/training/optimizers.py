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
from resnet18.training.ema import WeightAverage
from resnet18.models.resnet import decayed_kernels


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
    elif train.optimizer == "lars":
        optimizer = LARS(learning_rate=schedule, momentum=train.momentum, weight_decay=train.weight_decay)
        decoupled = None  # LARS applies the decay itself, to the weights it adapts
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


def make_objective(model: keras.Model, config: Config, num_classes: int, teacher: keras.Model | None = None
                   ) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, int]]:
    """(images, targets) -> (per-example loss, correct predictions, examples per global batch).

    Classification: softmax cross-entropy on (smoothed) targets, or the distillation loss when a
    teacher is given. SimCLR: `images` are [b, 2, H, W, 3] view pairs; NT-Xent per view, over the
    global batch of 2B views; "correct" counts anchors whose positive is their most similar view.
    """
    train = config.train
    smoothing = train.label_smoothing
    if train.task == "simclr":
        from resnet18.tasks.simclr import nt_xent

        def contrastive(views, targets):  # noqa: ARG001 - no labels in self-supervised training
            shape = tf.shape(views)
            pairs = tf.reshape(views, tf.concat([[2 * shape[0]], shape[2:]], 0))  # view 1, view 2, view 1, ...
            projections = tf.reshape(model(pairs, training=True), [shape[0], 2, -1])
            losses, correct = nt_xent(projections[:, 0], projections[:, 1], config.simclr.temperature)
            # Half the found positives: the loop divides by images, and there are two anchors per image.
            return losses, tf.reduce_sum(correct) / 2.0, 2 * train.global_batch_size

        return contrastive

    def classify(images, targets):
        logits = model(images, training=True)
        smoothed = targets * (1.0 - smoothing) + smoothing / num_classes
        if teacher is None:
            per_example = tf.nn.softmax_cross_entropy_with_logits(smoothed, tf.cast(logits, tf.float32))
        else:
            from resnet18.tasks.distillation import distillation_loss

            teacher_logits = tf.stop_gradient(teacher(images, training=False))  # frozen, inference mode
            per_example = distillation_loss(logits, teacher_logits, smoothed, config.distill.alpha,
                                            config.distill.temperature)
        predictions = tf.argmax(logits, -1, output_type=tf.int32)
        correct = tf.equal(predictions, tf.argmax(targets, -1, output_type=tf.int32))
        return per_example, tf.reduce_sum(tf.cast(correct, tf.float32)), train.global_batch_size

    return classify


def make_train_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, config: Config, num_classes: int,
    weight_average: WeightAverage | None = None, teacher: keras.Model | None = None,
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """One replica's training step: (images, labels) -> (loss, correct predictions).

    `labels` are class ids [batch] or soft targets [batch, classes] (CutMix). The loss
    is averaged over the *global* batch (`compute_average_loss`), so the gradients the
    optimizer sums across replicas are those of the global batch. With
    `grad_accum_steps` N the replica's batch runs as N sequential micro-batches whose
    gradients are summed before one update: the same gradient (without batch norm,
    whose statistics see micro-batches), 1/N of the activation memory. The objective
    (classification, distillation from `teacher`, SimCLR) is `make_objective`'s.
    """
    train = config.train
    l2_decay = train.weight_decay if train.weight_decay_mode == "l2" and train.optimizer != "lars" else 0.0
    accumulation = train.grad_accum_steps
    kernels = decayed_kernels(model)
    variables = model.trainable_variables
    objective = make_objective(model, config, num_classes, teacher)

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
        # whose collectives would be inside: config refuses that; train.py drops xla on TPUs).
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
