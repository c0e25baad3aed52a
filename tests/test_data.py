"""Input pipeline: sharding, exact-once evaluation, deterministic order and augmentation."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet18.config import DataConfig
from resnet18.errors import SetupError
from resnet18 import data as data_lib
from resnet18 import generated_cifar10
from tests.conftest import TINY_JOB, TINY_TEST, TINY_TRAIN, run_launcher


def context(pipelines: int, pipeline_id: int, replicas: int | None = None) -> tf.distribute.InputContext:
    return tf.distribute.InputContext(pipelines, pipeline_id, replicas or pipelines)


def image_keys(images: np.ndarray) -> list[bytes]:
    return [hashlib.sha1(image.tobytes()).digest() for image in images]


@pytest.fixture(scope="module")
def source(tiny_data_dir):
    return data_lib.prepare_source(DataConfig(data_dir=tiny_data_dir), "/unused")


def test_generated_source_is_read_by_the_real_cifar10_builder(source):
    assert type(source.builder).__name__ == "Cifar10"
    assert (source.num_train, source.num_test) == (TINY_TRAIN, TINY_TEST)
    assert source.class_names[:2] == ("airplane", "automobile")


def test_two_pipelines_see_disjoint_halves_that_cover_the_data(source):
    shards = [
        image_keys(np.stack([image for image, _ in data_lib.decoded_examples(source, "train", context(2, i), 32).as_numpy_iterator()]))
        for i in range(2)
    ]
    everything = image_keys(np.stack([example["image"] for example in tfds.as_numpy(
        source.builder.as_dataset(split="train"))]))
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(everything)
    assert abs(len(shards[0]) - len(shards[1])) <= 1


@pytest.mark.parametrize("global_batch, pipelines, replicas", [(64, 1, 1), (48, 2, 2), (96, 1, 2), (30, 3, 3), (512, 2, 4)])
def test_evaluation_counts_every_example_exactly_once(source, global_batch, pipelines, replicas):
    fn = data_lib.eval_dataset_fn(source, DataConfig(), global_batch)
    steps = data_lib.eval_steps(source, global_batch, pipelines)
    seen = []
    for pipeline in range(pipelines):
        batches = list(fn(context(pipelines, pipeline, replicas)).as_numpy_iterator())
        assert len(batches) == steps * replicas // pipelines  # every replica gets the same number of steps
        for images, _, mask in batches:
            assert images.shape[0] == global_batch // replicas
            seen.extend(image_keys(images[mask == 1]))
    assert len(seen) == TINY_TEST and len(set(seen)) == len(set(image_keys(np.stack([
        example["image"] for example in tfds.as_numpy(source.builder.as_dataset(split="test"))]))))


def test_training_order_is_deterministic_and_resumable(source):
    def labels(start_step=0, seed=5):
        fn = data_lib.train_dataset_fn(source, DataConfig(), 64, epochs=2, seed=seed, start_step=start_step)
        return [batch_labels for _, batch_labels in fn(context(1, 0)).as_numpy_iterator()]

    full = labels()
    assert len(full) == 2 * (TINY_TRAIN // 64)
    assert all(np.array_equal(a, b) for a, b in zip(full, labels()))
    resumed = labels(start_step=13)  # mid-epoch 2
    assert len(resumed) == len(full) - 13
    assert all(np.array_equal(a, b) for a, b in zip(full[13:], resumed))
    assert not all(np.array_equal(a, b) for a, b in zip(full, labels(seed=6)))
    assert not np.array_equal(np.concatenate(full[:10]), np.concatenate(full[10:20]))  # epochs differ


def test_each_epoch_uses_every_example_at_most_once(source):
    fn = data_lib.train_dataset_fn(source, DataConfig(augmentation="none"), 64, epochs=1, seed=0)
    images = np.concatenate([batch for batch, _ in fn(context(1, 0)).as_numpy_iterator()])
    keys = image_keys(images)
    assert len(keys) == (TINY_TRAIN // 64) * 64 and len(set(keys)) == len(keys)


def test_crop_flip_is_an_exact_shift_and_flip():
    images = tf.reshape(tf.range(2 * 8 * 8 * 3) % 251, [2, 8, 8, 3])
    images = tf.cast(images, tf.uint8)
    out = data_lib.crop_flip(images, tf.constant([1, 2], tf.int64), padding=2).numpy()
    assert np.array_equal(out, np.round(out))  # nearest neighbour: exact pixel values
    source = images.numpy()
    for index in range(2):
        matches = []
        for flip in (False, True):
            base = source[index, :, ::-1] if flip else source[index]
            padded = np.pad(base, ((2, 2), (2, 2), (0, 0)))
            matches += [(dy, dx) for dy in range(5) for dx in range(5)
                        if np.array_equal(padded[dy:dy + 8, dx:dx + 8], out[index])]
        assert matches, "output is not a shifted (and possibly flipped) copy of the input"


@pytest.mark.parametrize("augmentation", ["crop_flip", "rotate_shift_zoom_flip", "none"])
def test_augmentations_keep_shape_and_are_seeded(augmentation):
    images = tf.cast(tf.random.stateless_uniform([4, 32, 32, 3], [1, 2], 0, 255, tf.int32), tf.uint8)
    augment = data_lib.make_augmentation(augmentation)
    first = augment(images, tf.constant([3, 4], tf.int64))
    again = augment(images, tf.constant([3, 4], tf.int64))
    other = augment(images, tf.constant([3, 5], tf.int64))
    assert first.shape == images.shape
    assert 0 <= float(tf.reduce_min(tf.cast(first, tf.float32))) and float(tf.reduce_max(tf.cast(first, tf.float32))) <= 255
    assert np.array_equal(first, again)
    assert np.array_equal(np.asarray(first, np.float32), np.asarray(images, np.float32)) == (augmentation == "none")
    assert np.array_equal(first, other) == (augmentation == "none")


def test_image_folder_of_other_sizes_is_resized(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        for label in ("cats", "dogs"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(count // 2):
                image = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
                (folder / f"{index}.png").write_bytes(tf.io.encode_png(image).numpy())
    source = data_lib.prepare_source(DataConfig(image_folder=str(tmp_path)), "/unused")
    assert source.class_names == ("cats", "dogs") and (source.num_train, source.num_test) == (6, 4)
    fn = data_lib.train_dataset_fn(source, DataConfig(image_folder=str(tmp_path)), 2, epochs=1, seed=0)
    images, labels = next(fn(context(1, 0)).as_numpy_iterator())
    assert images.shape == (2, 32, 32, 3) and set(labels) <= {0, 1}


def test_image_folder_without_test_split_is_a_setup_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(SetupError, match="missing: \\['test'\\]"):
        data_lib.prepare_source(DataConfig(image_folder=str(tmp_path)), "/unused")


def test_unknown_dataset_name_is_a_setup_error():
    with pytest.raises(SetupError, match="not a TFDS data set name"):
        data_lib.prepare_source(DataConfig(dataset="no_such_dataset_xyz"), "/unused")


def test_generated_archive_has_the_cifar10_binary_layout(tmp_path):
    path = tmp_path / "cifar-10-binary.tar.gz"
    generated_cifar10.write_archive(str(path), 50, 20, seed=0)
    import tarfile
    with tarfile.open(path) as archive:
        names = sorted(archive.getnames())
        test_bytes = archive.extractfile("cifar-10-batches-bin/test_batch.bin").read()
    assert names == sorted([f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)]
                           + ["cifar-10-batches-bin/test_batch.bin", "cifar-10-batches-bin/batches.meta.txt"])
    records = np.frombuffer(test_bytes, np.uint8).reshape(20, 1 + 3072)
    images, labels = generated_cifar10.make_examples(20, 1)
    assert np.array_equal(records[:, 0], labels)
    assert np.array_equal(records[:, 1:].reshape(20, 3, 32, 32).transpose(0, 2, 3, 1), images)


def test_preparing_generated_data_leaves_the_installed_package_alone(tmp_path):
    checksums = os.path.join(os.path.dirname(tfds.__file__), "url_checksums", "cifar10.txt")
    before = open(checksums, "rb").read()
    generated_cifar10.prepare(str(tmp_path), 100, 50)
    assert open(checksums, "rb").read() == before
    assert "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd" in before.decode()
    with pytest.raises(ValueError, match="already holds generated"):
        generated_cifar10.prepare(str(tmp_path), 200, 50)


def test_missing_cifar10_offline_exits_2_with_instructions(tmp_path):
    # Point every proxy at a closed loopback port: no traffic leaves this machine.
    closed = "http://127.0.0.1:9"
    env = {"HTTP_PROXY": closed, "HTTPS_PROXY": closed, "http_proxy": closed, "https_proxy": closed,
           "NO_PROXY": "", "no_proxy": ""}
    result = run_launcher("--job", TINY_JOB, "--set", "data.generated.train_examples=0",
                          "data.generated.test_examples=0", f"data.data_dir={tmp_path / 'tfds'}",
                          f"data.manual_dir={tmp_path / 'manual'}", "--workdir", str(tmp_path / "run"),
                          env=env, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "cifar-10-binary.tar.gz" in result.stderr and "data.manual_dir" in result.stderr
    assert "Traceback" not in result.stderr
