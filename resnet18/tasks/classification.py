"""Evaluation on the test split: every example exactly once, loss, accuracy and confusion matrix.

The evaluation set pads each input pipeline to the same number of full batches
with masked examples (data.py); the step sums per-example values times the mask,
so the totals cover each test example once whatever the batch and the number of
replicas. Batch-norm moving statistics are pooled across replicas first
(replicas.py), so every replica evaluates the same weights.

    python -m launcher --job jobs/cpu_smoke.yaml     # evaluates after every epoch
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from resnet18.runtime.errors import TrainingError


def make_evaluate(strategy: tf.distribute.Strategy, model: keras.Model, dataset, steps: int, num_classes: int,
                  num_examples: int, tta_flip: bool, sync_statistics: Callable[[], None]
                  ) -> Callable[[], dict[str, Any]]:
    """A function that evaluates `model` on the distributed `dataset` of (images, labels, mask).

    It returns test_loss, test_accuracy, test_examples and the confusion matrix (rows: true class).
    """

    def eval_step(images, labels, mask):
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
