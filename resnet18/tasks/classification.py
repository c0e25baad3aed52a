"""Supervised classification: the network's logits against the (smoothed, or CutMix-mixed) labels.

- Network: the architecture `model.arch` names (models/); with `model.freeze_encoder`
  only the classifier ("logits") trains and the frozen batch norms run in inference mode
  (linear evaluation of a `train.init_from` encoder).
- Objective: softmax cross-entropy on targets smoothed by `train.label_smoothing`;
  "correct" counts argmax hits against the targets' argmax.
- Evaluation: the test split, every example exactly once whatever the batch and the
  number of replicas (padding is masked), loss, accuracy and the confusion matrix; with
  `train.tta_flip` the mean logits of each image and its mirror image. Batch-norm moving
  statistics are pooled across replicas first, so every replica evaluates the same weights.

TensorFlow is imported inside the functions: config validation reads this module's
`TASK.check` before TensorFlow starts (tasks/task.py).

    python -m launcher --job jobs/cpu_smoke.yaml
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from resnet18.config import Config
from resnet18.registry import lookup
from resnet18.tasks.task import Evaluate, Objective, Setting, Task

if TYPE_CHECKING:
    import keras

    from resnet18.data.augment import Augmentation
    from resnet18.data.sources import Source


def check(config: Config) -> None:
    """Classification takes every option of the trainer."""


def build_network(config: Config, num_classes: int, precision: str = "float32") -> keras.Model:
    """The classifier of `model.*`; with model.freeze_encoder only its "logits" layer trains."""
    from resnet18.models import build_model

    model = build_model(config, num_classes, precision)
    if config.model.freeze_encoder:  # Keras runs non-trainable BatchNormalization in inference mode
        for layer in model.layers:
            layer.trainable = layer.name == "logits"
    return model


def train_augmentation(config: Config) -> Augmentation:
    from resnet18.data.augment import AUGMENTATIONS

    return lookup(AUGMENTATIONS, config.data.augmentation, "data.augmentation")


def cross_entropy(model: keras.Model, config: Config, num_classes: int) -> Objective:
    """Softmax cross-entropy of `model`'s logits on smoothed targets (float32), per example."""
    import tensorflow as tf

    from resnet18.autograph import as_written

    smoothing = config.train.label_smoothing

    @as_written
    def objective(images, targets):
        logits = model(images, training=True)
        smoothed = targets * (1.0 - smoothing) + smoothing / num_classes
        per_example = tf.nn.softmax_cross_entropy_with_logits(smoothed, tf.cast(logits, tf.float32))
        return per_example, correct_count(logits, targets), config.train.global_batch_size

    return objective


def correct_count(logits, targets):
    """How many argmax predictions hit the targets' argmax (float32)."""
    import tensorflow as tf

    predictions = tf.argmax(logits, -1, output_type=tf.int32)
    return tf.reduce_sum(tf.cast(tf.equal(predictions, tf.argmax(targets, -1, output_type=tf.int32)), tf.float32))


def make_objective(setting: Setting, model: keras.Model, resuming: bool) -> Objective:  # noqa: ARG001
    return cross_entropy(model, setting.config, setting.num_classes)


def make_evaluation(setting: Setting, model: keras.Model, source: Source,
                    sync_statistics: Callable[[], None]) -> Evaluate:
    """The test split, every example once: test_loss, test_accuracy, test_examples and the confusion matrix."""
    from resnet18.data.pipeline import distributed_ordered, eval_steps

    batch = setting.config.train.global_batch_size
    return test_split_evaluation(setting.strategy, model, distributed_ordered(setting.strategy, source.test, batch),
                                 eval_steps(source.num_test, batch), source.num_classes, source.num_test,
                                 setting.config.train.tta_flip, sync_statistics, batch)


def test_split_evaluation(strategy, model: keras.Model, dataset, steps: int, num_classes: int, num_examples: int,
                          tta_flip: bool, sync_statistics: Callable[[], None], global_batch_size: int) -> Evaluate:
    """A function that evaluates `model` on the distributed `dataset` of (images, labels, mask).

    It returns test_loss, test_accuracy, test_examples and the confusion matrix (rows: true class).
    """
    import numpy as np
    import tensorflow as tf

    from resnet18.autograph import as_written
    from resnet18.data.pipeline import static_batch
    from resnet18.runtime.errors import TrainingError

    @as_written
    def eval_step(images, labels, mask):
        images, labels, mask = static_batch(global_batch_size, images, labels, mask)  # one graph on every layout
        logits = tf.cast(model(images, training=False), tf.float32)
        if tta_flip:  # mean logits of the image and its mirror image
            mirrored = tf.cast(model(tf.reverse(images, axis=[2]), training=False), tf.float32)
            logits = (logits + mirrored) / 2.0
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        predictions = tf.argmax(logits, -1, output_type=tf.int32)
        correct = tf.cast(tf.equal(predictions, labels), tf.float32)
        confusion = tf.math.confusion_matrix(labels, predictions, num_classes, weights=mask, dtype=tf.float32)
        return tf.reduce_sum(per_example * mask), tf.reduce_sum(correct * mask), tf.reduce_sum(mask), confusion

    @tf.function
    def eval_loop(iterator):
        totals = [tf.constant(0.0)] * 3 + [tf.zeros([num_classes, num_classes])]
        for _ in tf.range(steps):
            results = strategy.run(eval_step, args=next(iterator))
            totals = [total + strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                      for total, value in zip(totals, results)]
        return totals

    def evaluate() -> dict[str, Any]:
        sync_statistics()
        loss_sum, correct, count, confusion = eval_loop(iter(dataset))
        loss_sum, correct, count = float(loss_sum), float(correct), float(count)
        if int(round(count)) != num_examples:
            raise TrainingError(f"evaluation counted {count:.0f} examples, expected {num_examples}")
        return {"test_loss": loss_sum / count, "test_accuracy": correct / count, "test_examples": int(count),
                "confusion_matrix": np.rint(confusion.numpy()).astype(int).tolist()}

    return evaluate


TASK = Task(
    name="classification",
    sections=(),
    heads=("logits",),
    exports="classifier",
    accuracy="test split",
    metrics=("test_loss", "test_accuracy"),
    check=check,
    build_network=build_network,
    train_augmentation=train_augmentation,
    make_objective=make_objective,
    make_evaluation=make_evaluation,
)
