"""Knowledge distillation: a frozen teacher (e.g. the CIFAR ResNet50) teaches the student network.

    loss = alpha x CE(targets, student) + (1 - alpha) x T^2 x KL(softmax(teacher / T) || softmax(student / T))

(Hinton, Vinyals and Dean 2015). The T^2 keeps the soft term's gradients the same
size whatever T. The targets are the (smoothed, or CutMix-mixed) labels; the teacher
sees the very batch the student sees, augmented and mixed alike, in inference mode,
so its soft targets describe the same pixels. The student is a classifier like
classification's (same network, augmentation and evaluation).

The teacher is one this launcher trained: `distill.teacher_workdir` names its work
directory, whose config.yaml says how to build it (a classifier trained on the
student's data: the keys config.py marks `must_match(TEACHER)`) and whose best (else
latest) checkpoint holds its evaluated weights. It is built inside the strategy scope,
never trained and never saved into the student's checkpoints; WORKDIR/teacher.json
records which teacher (its checkpoint and a fingerprint of its weights) a student's
checkpoints were trained with, and a resumed run with another teacher exits 2.

    python -m launcher --job jobs/teacher_resnet50.yaml
    python -m launcher --job jobs/distill.yaml --set distill.teacher_workdir=runs/teacher_resnet50
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from resnet18 import config as config_lib
from resnet18 import identity
from resnet18.config import Config
from resnet18.identity import TEACHER
from resnet18.runtime.errors import ConfigError, SetupError
from resnet18.runtime.files import read_text, write_json
from resnet18.tasks import classification
from resnet18.tasks.task import Objective, Setting, Task

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

TEACHER_FILE = "teacher.json"


def check(config: Config) -> None:
    if not config.distill.teacher_workdir:
        raise ConfigError("train.task distillation needs distill.teacher_workdir: the work directory of a trained "
                          "teacher (python -m launcher --job jobs/teacher_resnet50.yaml)")


def distillation_loss(student_logits: tf.Tensor, teacher_logits: tf.Tensor, targets: tf.Tensor, alpha: float,
                      temperature: float) -> tf.Tensor:
    """Per-example loss: alpha x CE(targets, student) + (1 - alpha) x T^2 x KL(teacher_T || student_T).

    All float32; `targets` are probabilities [batch, classes] (one-hot, smoothed or mixed).
    """
    import tensorflow as tf

    student = tf.cast(student_logits, tf.float32)
    teacher = tf.cast(teacher_logits, tf.float32)
    hard = tf.nn.softmax_cross_entropy_with_logits(targets, student)
    teacher_log_p = tf.nn.log_softmax(teacher / temperature)
    student_log_p = tf.nn.log_softmax(student / temperature)
    kl = tf.reduce_sum(tf.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    return alpha * hard + (1.0 - alpha) * temperature ** 2 * kl


def distilled(model: keras.Model, teacher: keras.Model, config: Config, num_classes: int) -> Objective:
    """The student's objective: the distillation loss against the frozen teacher's logits on the same batch."""
    import tensorflow as tf

    from resnet18.autograph import as_written

    smoothing, options = config.train.label_smoothing, config.distill

    @as_written
    def objective(images, targets):
        logits = model(images, training=True)
        smoothed = targets * (1.0 - smoothing) + smoothing / num_classes
        teacher_logits = tf.stop_gradient(teacher(images, training=False))  # frozen, inference mode
        per_example = distillation_loss(logits, teacher_logits, smoothed, options.alpha, options.temperature)
        return per_example, classification.correct_count(logits, targets), config.train.global_batch_size

    return objective


def make_objective(setting: Setting, model: keras.Model, resuming: bool) -> Objective:
    """Loads the teacher, checks it is the one the checkpoints were distilled from, and returns the objective."""
    teacher, identity = load_teacher(setting.config, setting.strategy, setting.num_classes, setting.precision)
    check_same_teacher(setting.workdir, identity, resuming, setting.is_chief)
    return distilled(model, teacher, setting.config, setting.num_classes)


def teacher_config(student: Config) -> tuple[Config, str]:
    """(the teacher's config, its config.yaml path); checks it was trained on the student's data.

    Raises:
      SetupError: the teacher's work directory holds no run.
      ConfigError: the teacher was trained on other data (each differing key named).
    """
    import tensorflow as tf

    workdir = student.distill.teacher_workdir
    path = os.path.join(workdir, "config.yaml")
    if not tf.io.gfile.exists(path):
        raise SetupError(f"distill.teacher_workdir {workdir!r} holds no run (no config.yaml); train the teacher first "
                         "(python -m launcher --job jobs/teacher_resnet50.yaml)")
    with tf.io.gfile.GFile(path) as stream:
        teacher = config_lib.from_yaml_text(stream.read(), path)
    differing = identity.differences(teacher, student, TEACHER, sections=())
    if differing:
        raise ConfigError(f"distill.teacher_workdir {workdir!r} was trained on other data than this student "
                          "(teacher -> student):\n  " + "\n  ".join(differing))
    return teacher, path


def load_teacher(student: Config, strategy: tf.distribute.Strategy, num_classes: int, precision: str
                 ) -> tuple[keras.Model, dict]:
    """The frozen teacher with its evaluated weights, and what identifies it (for teacher.json)."""
    import hashlib

    import numpy as np
    import tensorflow as tf

    from resnet18.models import build_model
    from resnet18.runtime.checkpoint_files import checkpoint_candidates, evaluated_weights, restore_latest_good

    config, _ = teacher_config(student)
    workdir = student.distill.teacher_workdir
    best = os.path.join(workdir, "best")
    directory = best if checkpoint_candidates(best) else os.path.join(workdir, "checkpoints")
    with strategy.scope():
        teacher = build_model(config, num_classes, precision)
    teacher.trainable = False
    # The evaluated weights: best/ holds them as `model`; training checkpoints hold the average as `ema_model`.
    name = evaluated_weights(directory, config.train.ema_decay) if directory.endswith("checkpoints") else "model"
    try:
        prefix = restore_latest_good(tf.train.Checkpoint(**{name: teacher}), directory)
    except RuntimeError as error:
        raise SetupError(f"distill.teacher_workdir {workdir!r} holds no classifier of its model.* that this launcher "
                         f"can restore (its train.task is {config.train.task}): {error}") from None
    if prefix is None:
        raise SetupError(f"distill.teacher_workdir {workdir!r} holds no checkpoint; train the teacher first")
    digest = hashlib.sha256()
    for weight in teacher.weights:
        digest.update(np.asarray(weight.numpy()).tobytes())
    return teacher, {"teacher_workdir": workdir, "checkpoint": prefix, "arch": config.model.arch,
                     "width": config.model.width, "weights_sha256": digest.hexdigest()}


def check_same_teacher(workdir: str, identity: dict, resuming: bool, is_chief: bool) -> None:
    """Refuses to resume a student with another teacher than its checkpoints were trained with.

    Raises:
      ConfigError: WORKDIR/teacher.json names another teacher checkpoint or other weights, or cannot be
        read (exit 2).
    """
    path = os.path.join(workdir, TEACHER_FILE)
    text = read_text(path) if resuming else None
    try:
        recorded = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        raise ConfigError(f"{path} cannot be read (cut short?): it names the teacher the checkpoints in {workdir} "
                          "were distilled from. Restore it, or use another --workdir") from None
    if recorded is not None and recorded.get("weights_sha256") != identity["weights_sha256"]:
        raise ConfigError(f"the checkpoints in {workdir} were distilled from the teacher {recorded.get('checkpoint')}"
                          f" (weights sha256 {recorded.get('weights_sha256', '?')[:12]}...); this run's teacher is "
                          f"{identity['checkpoint']} (sha256 {identity['weights_sha256'][:12]}...). Resume with "
                          "that teacher, or use another --workdir")
    if is_chief:  # the other workers may be reading it (above)
        write_json(path, identity)


TASK = Task(
    name="distillation",
    sections=("distill",),
    heads=classification.TASK.heads,
    exports="classifier",
    accuracy=classification.TASK.accuracy,
    metrics=classification.TASK.metrics,
    check=check,
    build_network=classification.build_network,
    train_augmentation=classification.train_augmentation,
    make_objective=make_objective,
    make_evaluation=classification.make_evaluation,
)
