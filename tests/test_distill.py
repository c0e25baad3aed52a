"""Knowledge distillation: the loss against numpy, replicas against one device, the teacher's identity,
a student that learns the teacher, and a killed run that resumes bit for bit."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from launcher.strategy import make_strategy
from resnet18.config import Config, DistillConfig, RuntimeConfig, TrainConfig
from resnet18.tasks.distillation import distillation_loss
from resnet18.runtime.errors import ConfigError
from resnet18.training.loop import train_and_evaluate
from tests.conftest import TINY_JOB, run_launcher
from tests.helpers_tiny_model import replicated_steps, small_model
from tests.processes import Running
from tests.test_loop import micro_config


def test_the_loss_is_hintons_with_the_temperature_squared():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (6, 10)), rng.normal(0, 3, (6, 10))
    targets = np.eye(10)[rng.integers(0, 10, 6)] * 0.9 + 0.01  # smoothed labels
    alpha, temperature = 0.3, 4.0

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    hard = -(targets * log_softmax(student)).sum(axis=1)
    p_teacher = np.exp(log_softmax(teacher / temperature))
    kl = (p_teacher * (np.log(p_teacher) - log_softmax(student / temperature))).sum(axis=1)
    expected = alpha * hard + (1 - alpha) * temperature ** 2 * kl
    got = distillation_loss(tf.constant(student, tf.float32), tf.constant(teacher, tf.float32),
                            tf.constant(targets, tf.float32), alpha, temperature).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)  # float32 against float64
    same = distillation_loss(tf.constant(teacher, tf.float32), tf.constant(teacher, tf.float32),
                             tf.constant(targets, tf.float32), 0.0, temperature).numpy()
    np.testing.assert_allclose(same, 0.0, atol=1e-5)  # the KL of a distribution with itself


def test_distillation_on_two_replicas_takes_the_steps_of_one(two_replicas):
    # As tests/test_replicas.py: batch-norm-free student and teacher, same global batch; the teacher's
    # soft targets are per example, so splitting the batch changes only the order of float32 sums.
    config = Config(distill=DistillConfig(teacher_workdir="unused", alpha=0.2, temperature=3.0),
                    train=TrainConfig(global_batch_size=64, warmup_epochs=0, lr_schedule="constant",
                                      learning_rate=0.4))
    images = tf.random.stateless_uniform([64, 8, 8, 3], [5, 6], 0, 1)
    labels = tf.random.stateless_uniform([64], [7, 8], 0, 10, tf.int32)

    def teacher_for(strategy):
        with strategy.scope():
            teacher = small_model(seed=11)
        teacher.trainable = False
        return teacher

    one_device = make_strategy(RuntimeConfig(strategy="one_device"))
    one = replicated_steps(one_device, config, images, labels, 5, lambda: small_model(seed=3),
                           teacher_for(one_device))
    two = replicated_steps(two_replicas, config, images, labels, 5, lambda: small_model(seed=3),
                           teacher_for(two_replicas))
    plain = replicated_steps(one_device, Config(train=config.train), images, labels, 5, lambda: small_model(seed=3))
    for single, double in zip(one, two):
        np.testing.assert_allclose(double, single, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(one, plain))  # the teacher really changed the steps


@pytest.fixture(scope="module")
def teachers(micro_data_dir, tmp_path_factory):
    """Two micro ResNet50 teachers (other seeds) trained for 2 epochs."""
    root = tmp_path_factory.mktemp("teachers")
    strategy = make_strategy(RuntimeConfig(strategy="one_device"))
    for name, seed in (("a", 1), ("b", 2)):
        train_and_evaluate(micro_config(micro_data_dir, "model.arch=resnet50", "train.epochs=2",
                                        f"runtime.seed={seed}"), strategy, str(root / name))
    return root


def agreement(student_dir, teacher_dir) -> float:
    from launcher.export import labelled_test_images, load_trained_model

    _, source, student, _ = load_trained_model(str(student_dir))
    _, _, teacher, _ = load_trained_model(str(teacher_dir))
    images, _ = labelled_test_images(source)
    student_classes = np.argmax(student(images, training=False), 1)
    return float(np.mean(student_classes == np.argmax(teacher(images, training=False), 1)))


@pytest.mark.slow
def test_with_alpha_zero_the_student_comes_to_agree_with_its_teacher(micro_data_dir, teachers, tmp_path):
    strategy = make_strategy(RuntimeConfig(strategy="one_device"))
    student = micro_config(micro_data_dir, "train.task=distillation", f"distill.teacher_workdir={teachers / 'a'}",
                           "distill.alpha=0", "train.learning_rate=0.8")
    train_and_evaluate(micro_config(micro_data_dir, "train.epochs=1", "train.learning_rate=1e-12"), strategy,
                       str(tmp_path / "untrained"))
    train_and_evaluate(dataclass_epochs(student, 8), strategy, str(tmp_path / "student"))
    before, after = agreement(tmp_path / "untrained", teachers / "a"), agreement(tmp_path / "student", teachers / "a")
    print(f"agreement with the teacher: {before:.3f} untrained, {after:.3f} after 8 epochs of alpha=0")
    assert after > before + 0.2


def dataclass_epochs(config, epochs: int):
    import dataclasses

    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))


def test_a_student_resumed_with_another_teacher_exits_2_naming_it(micro_data_dir, teachers, tmp_path):
    strategy = make_strategy(RuntimeConfig(strategy="one_device"))
    shutil.copytree(teachers / "a", tmp_path / "teacher")
    student = micro_config(micro_data_dir, "train.task=distillation", f"distill.teacher_workdir={tmp_path / 'teacher'}")
    train_and_evaluate(student, strategy, str(tmp_path / "student"))
    recorded = json.loads((tmp_path / "student" / "teacher.json").read_text())
    assert recorded["arch"] == "resnet50" and recorded["checkpoint"].startswith(str(tmp_path / "teacher"))
    saved = [name for name, _ in tf.train.list_variables(str(tmp_path / "student" / "checkpoints"))]
    assert saved and not any(name.startswith("teacher") for name in saved)  # the teacher is not in them
    # The same directory, other weights (the teacher retrained): refused, and so is another directory.
    shutil.rmtree(tmp_path / "teacher" / "checkpoints")
    shutil.copytree(teachers / "b" / "checkpoints", tmp_path / "teacher" / "checkpoints")
    with pytest.raises(ConfigError, match="were distilled from the teacher"):
        train_and_evaluate(dataclass_epochs(student, 2), strategy, str(tmp_path / "student"))
    other = micro_config(micro_data_dir, "train.task=distillation", f"distill.teacher_workdir={teachers / 'b'}",
                         "train.epochs=2")
    with pytest.raises(ConfigError, match="distill.teacher_workdir: "):
        train_and_evaluate(other, strategy, str(tmp_path / "student"))


def test_a_teacher_of_other_data_is_refused_naming_the_key(micro_data_dir, teachers, tmp_path):
    import dataclasses

    student = micro_config(micro_data_dir, "train.task=distillation", f"distill.teacher_workdir={teachers / 'a'}")
    student = dataclasses.replace(student, data=dataclasses.replace(student.data, image_size=16))
    with pytest.raises(ConfigError, match="data.image_size: 32 -> 16"):
        train_and_evaluate(student, make_strategy(RuntimeConfig(strategy="one_device")), str(tmp_path / "s"))


@pytest.mark.slow
def test_a_killed_distillation_resumes_bit_for_bit(tiny_data_dir, tmp_path):
    teacher = run_launcher("--job", TINY_JOB, "--workdir", str(tmp_path / "teacher"), "--set",
                           f"data.data_dir={tiny_data_dir}", "model.arch=resnet50", "train.epochs=1")
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    args = ["--job", TINY_JOB, "--strategy", "one_device", "--set", f"data.data_dir={tiny_data_dir}",
            "train.task=distillation", f"distill.teacher_workdir={tmp_path / 'teacher'}", "train.epochs=3",
            "train.deterministic=true",
            "train.checkpoint_every_steps=4", "train.steps_per_loop=2", "data.cutmix_prob=0.5",
            "train.grad_accum_steps=2"]
    reference = run_launcher(*args, "--workdir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    run = Running([*args, "--workdir", str(tmp_path / "run")])
    run.wait_for(r"^Checkpoint at step 12:")
    os.kill(run.process.pid, signal.SIGKILL)
    run.finish()
    again = run_launcher(*args, "--workdir", str(tmp_path / "run"))
    assert again.returncode == 0, again.stderr[-2000:]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("reference", "run")]
    assert summaries[1]["resumed_from_step"] >= 12
    assert summaries[1]["weights_sha256"] == summaries[0]["weights_sha256"]


def test_the_cifar_resnet50_has_its_published_size():
    from resnet18.models.resnet import build_resnet50

    model = build_resnet50()
    assert sum(int(np.prod(weight.shape)) for weight in model.trainable_weights) == 23_520_842  # kuangliu's ResNet50
    assert model.count_params() == 23_573_962  # + the batch-norm moving statistics
    assert isinstance(model.get_layer("stage1_block1_proj_conv"), keras.layers.Conv2D)  # 64 -> 256 projects


@pytest.mark.slow
def test_two_workers_distil_to_identical_weights(tiny_data_dir, tmp_path):
    teacher = run_launcher("--job", TINY_JOB, "--workdir", str(tmp_path / "teacher"), "--set",
                           f"data.data_dir={tiny_data_dir}", "model.arch=resnet50", "train.epochs=1")
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    result = run_launcher("--workers", "2", "--job", TINY_JOB, "--workdir", str(tmp_path / "student"), "--set",
                          f"data.data_dir={tiny_data_dir}", "train.task=distillation",
                          f"distill.teacher_workdir={tmp_path / 'teacher'}",
                          "train.epochs=1", "train.grad_accum_steps=2")
    assert result.returncode == 0, result.stdout[-3000:]
    fingerprints = set(re.findall(r"\[worker \d\] Final weights sha256 ([0-9a-f]{64})", result.stdout))
    assert len(fingerprints) == 1  # both workers distilled the same student
    assert json.loads((tmp_path / "student" / "teacher.json").read_text())["arch"] == "resnet50"


def test_a_worker_reading_teacher_json_never_sees_the_chief_half_way_through_writing_it(tmp_path):
    # On a resume every worker reads WORKDIR/teacher.json while the chief rewrites it: written in place, a
    # reader could find it empty or cut short (a JSONDecodeError traceback, or a false "another teacher").
    import threading

    from resnet18.tasks.distillation import TEACHER_FILE, check_same_teacher

    identity = {"teacher_workdir": "runs/teacher", "checkpoint": "runs/teacher/best/ckpt-40", "arch": "resnet18",
                "width": 64, "weights_sha256": "ab" * 32, "padding": "x" * 200_000}
    check_same_teacher(str(tmp_path), identity, resuming=False, is_chief=True)
    seen, writing = [], True

    def read_while_written():
        while writing:
            seen.append((tmp_path / TEACHER_FILE).read_text())

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        for _ in range(200):
            check_same_teacher(str(tmp_path), identity, resuming=True, is_chief=True)
    finally:
        writing = False
        reader.join()
    assert seen and all(json.loads(text) == identity for text in seen)


@pytest.mark.parametrize("damaged", ["", '{"weights_sha'])
def test_a_damaged_teacher_record_on_a_resume_exits_2_not_passes(tmp_path, damaged):
    # A teacher.json cut short (the older in-place writer, killed) must not let a resume with any teacher through,
    # and the chief must not overwrite the record with the new teacher.
    from resnet18.tasks.distillation import TEACHER_FILE, check_same_teacher

    (tmp_path / TEACHER_FILE).write_text(damaged)
    identity = {"checkpoint": "runs/other/best/ckpt-40", "weights_sha256": "cd" * 32}
    with pytest.raises(ConfigError, match="teacher.json cannot be read"):
        check_same_teacher(str(tmp_path), identity, resuming=True, is_chief=True)
    assert (tmp_path / TEACHER_FILE).read_text() == damaged
