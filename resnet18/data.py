"""Input pipelines: TFDS or image-folder sources, per-worker sharding, batch augmentation.

Each input pipeline (one per worker) reads its own 1/N of the examples
(`Dataset.shard` by example: CIFAR-10 has one file per split, so file sharding
cannot split it), batches with the per-replica batch size derived from the
global one, and augments whole batches at once.

Training order is a pure function of (seed, epoch, pipeline): every epoch is
shuffled with its own seed and augmentation uses stateless random ops seeded
by (seed, epoch, batch). A run resumed at step s therefore sees exactly the
batches an uninterrupted run would (see `train_dataset_fn(start_step=...)`).

Evaluation pads each pipeline's shard with masked examples to the same number
of full batches, so every test example is counted exactly once whatever the
global batch or the number of replicas.

    python -c "import resnet18.data as d; help(d)"
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import urllib.error
import urllib.request
from typing import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from resnet18.config import DataConfig
from resnet18.errors import SetupError
from resnet18 import generated_cifar10
from resnet18.cutmix import cutmix

CACHE_LIMIT_BYTES = 4 << 30  # keep decoded images in memory below this size
REACHABLE_TIMEOUT_SECONDS = 15
CIFAR10_MANUAL_HELP = """\
CIFAR-10 is not prepared in {data_dir} and could not be downloaded ({reason}).
To prepare it offline: copy cifar-10-binary.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html,
170052171 bytes, sha256 c4a38c50...bca1dd) into a folder and run again with
  --set data.manual_dir=/path/to/that/folder
or point --set data.data_dir=... at a TFDS data_dir where cifar10 is already prepared
(`tfds build cifar10 --data_dir DIR` on a machine with network, then copy DIR).
To try the launcher without CIFAR-10, run the offline smoke job: --job jobs/cpu_smoke.yaml"""


@dataclasses.dataclass(frozen=True)
class Source:
    """A prepared data set: where to read it and what it holds."""

    builder: tfds.core.DatasetBuilder
    train_split: str
    test_split: str
    num_train: int
    num_test: int
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def prepare_source(data: DataConfig, workdir: str) -> Source:
    """Finds (and if needed prepares) the data set the config names.

    Raises:
      SetupError: the data set is missing and cannot be prepared here (exit 2).
    """
    tfds.disable_progress_bar()  # one line per step of preparation, not a redrawn bar
    if data.image_folder:
        return _image_folder_source(data.image_folder)
    data_dir = data.data_dir
    if data.generated.train_examples:
        data_dir = data_dir or os.path.join(workdir, "generated_data")
    # Workers sharing a file system take turns: the first prepares, the others reuse.
    with _preparation_lock(data_dir):
        if data.generated.train_examples:
            try:
                generated_cifar10.prepare(data_dir, data.generated.train_examples, data.generated.test_examples)
            except ValueError as error:
                raise SetupError(f"data.generated: {error}") from None
        return _prepared_tfds_source(data, data_dir)


@contextlib.contextmanager
def _preparation_lock(data_dir: str | None):
    """An exclusive flock on DATA_DIR/.prepare.lock (local and NFS paths; a no-op for gs://)."""
    if data_dir is None or "://" in data_dir:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".prepare.lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepared_tfds_source(data: DataConfig, data_dir: str | None) -> Source:
    try:
        builder = tfds.builder(data.dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise SetupError(
            f"data.dataset {data.dataset!r} is not a TFDS data set name "
            "(see `tfds.list_builders()`), or use data.image_folder for your own images"
        ) from None
    if not _is_prepared(builder):
        config = tfds.download.DownloadConfig(manual_dir=data.manual_dir)
        try:
            if not _has_manual_download(builder, data.manual_dir):
                _check_reachable(builder)
            builder.download_and_prepare(download_config=config)
        except Exception as error:  # network, checksum or manual-dir failures all end here
            reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:3]) or type(error).__name__
            if data.dataset == "cifar10":
                raise SetupError(CIFAR10_MANUAL_HELP.format(data_dir=builder.data_dir, reason=reason)) from None
            raise SetupError(
                f"data set {data.dataset!r} is not prepared in {builder.data_dir} and preparing it failed: "
                f"{reason}. Prepare it with `tfds build {data.dataset}` and pass --set data.data_dir=DIR"
            ) from None
    return _tfds_source(builder, data.dataset)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _has_manual_download(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> bool:
    """Whether every registered download of the data set already lies in `manual_dir`."""
    url_infos = builder.url_infos or {}
    return bool(manual_dir and url_infos) and all(
        info.filename and os.path.exists(os.path.join(manual_dir, info.filename)) for info in url_infos.values()
    )


def _check_reachable(builder: tfds.core.DatasetBuilder) -> None:
    """Fails in seconds when the data set's download host cannot be reached.

    TFDS retries a failed download ten times with exponential back-off (about
    3.5 minutes) before it gives up; offline, the user should hear at once.
    """
    url = next(iter(builder.url_infos or {}), None)
    if url is None:
        return
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=REACHABLE_TIMEOUT_SECONDS).close()
    except urllib.error.HTTPError:
        return  # the host answered: let TFDS deal with the details
    except (OSError, ValueError) as error:
        raise OSError(f"{url} is not reachable: {getattr(error, 'reason', error)}") from None


def _tfds_source(builder: tfds.core.DatasetBuilder, name: str) -> Source:
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise SetupError(f"data set {name!r} has no 'image' and 'label' features; it is not image classification")
    splits = builder.info.splits
    test_split = next((split for split in ("test", "validation") if split in splits), None)
    if "train" not in splits or test_split is None:
        raise SetupError(f"data set {name!r} needs a 'train' and a 'test' (or 'validation') split; it has {list(splits)}")
    return Source(
        builder=builder,
        train_split="train",
        test_split=test_split,
        num_train=splits["train"].num_examples,
        num_test=splits[test_split].num_examples,
        class_names=tuple(features["label"].names),
    )


def _image_folder_source(root: str) -> Source:
    if not tf.io.gfile.isdir(root):
        raise SetupError(f"data.image_folder {root!r} is not a directory")
    builder = tfds.ImageFolder(root)
    splits = builder.info.splits
    missing = [split for split in ("train", "test") if split not in splits]
    if missing:
        raise SetupError(
            f"data.image_folder {root!r} needs train/<class>/* and test/<class>/* folders; missing: {missing}"
        )
    return Source(
        builder=builder,
        train_split="train",
        test_split="test",
        num_train=splits["train"].num_examples,
        num_test=splits["test"].num_examples,
        class_names=tuple(builder.info.features["label"].names),
    )


def steps_per_epoch(source: Source, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder is left for the next shuffle)."""
    steps = source.num_train // global_batch_size
    if steps < 1:
        raise SetupError(
            f"train.global_batch_size {global_batch_size} is larger than the {source.num_train} training examples"
        )
    return steps


def eval_steps(source: Source, global_batch_size: int, num_input_pipelines: int) -> int:
    """Batches per replica that cover the largest pipeline's shard of the test split."""
    largest_shard = math.ceil(source.num_test / num_input_pipelines)
    examples_per_step_per_pipeline = global_batch_size // num_input_pipelines
    return max(1, math.ceil(largest_shard / examples_per_step_per_pipeline))


def decoded_examples(source: Source, split: str, context: tf.distribute.InputContext, image_size: int) -> tf.data.Dataset:
    """This pipeline's shard of `split` as (uint8 image [S, S, 3], int32 label)."""
    dataset = source.builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.shard(context.num_input_pipelines, context.input_pipeline_id)

    def decode(example):
        image = example["image"]
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        if image.shape[0] != image_size or image.shape[1] != image_size:
            image = tf.image.resize(image, [image_size, image_size], antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        image = tf.ensure_shape(image, [image_size, image_size, 3])
        return image, tf.cast(example["label"], tf.int32)

    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    shard_bytes = source.num_train * image_size * image_size * 3 // context.num_input_pipelines
    if shard_bytes <= CACHE_LIMIT_BYTES:
        dataset = dataset.cache()
    return dataset


def train_dataset_fn(
    source: Source,
    data: DataConfig,
    global_batch_size: int,
    epochs: int,
    seed: int,
    start_step: int = 0,
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """A dataset function for `strategy.distribute_datasets_from_function` (training).

    Yields (images float32 RGB 0-255, labels int32) batches of the per-replica size (the model
    standardises its input),
    exactly `steps_per_epoch x replicas_per_pipeline` per epoch, from `start_step` on;
    with CutMix (`data.cutmix_prob` > 0) the labels are soft targets [batch, classes].
    """
    steps = steps_per_epoch(source, global_batch_size)
    augmentation = make_augmentation(data.augmentation)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch_size = context.get_per_replica_batch_size(global_batch_size)
        replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
        batches_per_epoch = steps * replicas_per_pipeline
        examples = decoded_examples(source, source.train_split, context, data.image_size)
        pipeline = tf.cast(context.input_pipeline_id, tf.int64)

        def one_epoch(epoch):
            shuffled = examples.shuffle(
                data.shuffle_buffer, seed=_mix(seed, epoch, pipeline), reshuffle_each_iteration=False
            )
            batches = shuffled.batch(batch_size, drop_remainder=True).take(batches_per_epoch)
            return batches.enumerate().map(lambda index, batch: (epoch, index, batch))

        start_epoch, skip_steps = divmod(start_step, steps)
        dataset = tf.data.Dataset.range(start_epoch, epochs).flat_map(one_epoch)
        dataset = dataset.skip(skip_steps * replicas_per_pipeline)

        def augment(epoch, index, batch):
            images, labels = batch
            # Stateless: the same (seed, epoch, pipeline, batch) always gives the same augmentation.
            batch_seed = tf.stack([tf.cast(seed, tf.int64), _mix(epoch, pipeline, index)])
            images = tf.cast(augmentation(images, batch_seed), tf.float32)
            if data.cutmix_prob:
                mix_seed = tf.random.experimental.stateless_fold_in(batch_seed, 1)
                return cutmix(images, labels, source.num_classes, mix_seed, data.cutmix_alpha, data.cutmix_prob)
            return images, labels

        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def eval_dataset_fn(
    source: Source, data: DataConfig, global_batch_size: int
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """A dataset function for evaluation: (images, labels, mask), every example once.

    Each pipeline yields `eval_steps x replicas_per_pipeline` full batches; padding
    examples have mask 0 and must not be counted.
    """

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch_size = context.get_per_replica_batch_size(global_batch_size)
        replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
        steps = eval_steps(source, global_batch_size, context.num_input_pipelines)
        target = steps * replicas_per_pipeline * batch_size
        real = decoded_examples(source, source.test_split, context, data.image_size).map(
            lambda image, label: (image, label, tf.constant(1.0))
        )
        padding = tf.data.Dataset.from_tensors(
            (tf.zeros([data.image_size, data.image_size, 3], tf.uint8), tf.constant(0), tf.constant(0.0))
        ).repeat()
        dataset = real.concatenate(padding).take(target).batch(batch_size, drop_remainder=True)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def _mix(*values) -> tf.Tensor:
    """Folds several int64 values into one seed (a simple polynomial hash)."""
    result = tf.constant(0, tf.int64)
    for value in values:
        result = result * 1_000_003 + tf.cast(value, tf.int64)
    return result % (2**31 - 1)


def make_augmentation(name: str) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Batch augmentation by name: crop_flip, rotate_shift_zoom_flip or none."""
    if name == "crop_flip":
        return crop_flip
    if name == "rotate_shift_zoom_flip":
        return rotate_shift_zoom_flip
    return lambda images, seed: images


def crop_flip(images: tf.Tensor, seed: tf.Tensor, padding: int = 4) -> tf.Tensor:
    """Zero-pad by `padding`, random crop back to size, random horizontal flip; one op per batch."""
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    shifts = tf.random.stateless_uniform([batch, 2], seeds[0], -padding, padding + 1, dtype=tf.int32)
    flips = tf.random.stateless_uniform([batch], seeds[1], 0, 2, dtype=tf.int32)
    return _affine(images, scale_x=1.0 - 2.0 * tf.cast(flips, tf.float32), scale_y=tf.ones([batch]),
                   angle=tf.zeros([batch]), shift_x=tf.cast(shifts[:, 0], tf.float32),
                   shift_y=tf.cast(shifts[:, 1], tf.float32), fill_mode="CONSTANT", interpolation="NEAREST")


def rotate_shift_zoom_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Keras ImageDataGenerator's set on whole batches: rotation 15 degrees, width/height
    shift 0.1, zoom 0.1, horizontal flip, nearest fill (the Keras tutorial recipe's)."""
    batch = tf.shape(images)[0]
    size = tf.cast(tf.shape(images)[1], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    angle = tf.random.stateless_uniform([batch], seeds[0], -15.0, 15.0) * (math.pi / 180.0)
    shifts = tf.random.stateless_uniform([batch, 2], seeds[1], -0.1, 0.1) * size
    zoom = tf.random.stateless_uniform([batch, 2], seeds[2], 0.9, 1.1)
    flips = tf.cast(tf.random.stateless_uniform([batch], seeds[3], 0, 2, dtype=tf.int32), tf.float32)
    return _affine(images, scale_x=zoom[:, 0] * (1.0 - 2.0 * flips), scale_y=zoom[:, 1], angle=angle,
                   shift_x=shifts[:, 0], shift_y=shifts[:, 1], fill_mode="NEAREST", interpolation="BILINEAR")


def _affine(images, *, scale_x, scale_y, angle, shift_x, shift_y, fill_mode, interpolation) -> tf.Tensor:
    """Applies a per-example affine map about the image centre (output -> input coordinates).

    Returns float32 images in 0-255 (exact pixel copies with NEAREST interpolation).
    """
    size = tf.cast(tf.shape(images)[1:3], tf.float32)
    center_y, center_x = (size[0] - 1.0) / 2.0, (size[1] - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # input = R(angle) * diag(scale) * (output - centre) + centre + shift
    a0, a1 = cos * scale_x, -sin * scale_y
    b0, b1 = sin * scale_x, cos * scale_y
    a2 = center_x - a0 * center_x - a1 * center_y + shift_x
    b2 = center_y - b0 * center_x - b1 * center_y + shift_y
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    output = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32),
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation=interpolation,
        fill_mode=fill_mode,
    )
    return output  # float32 in 0-255: the model takes floats, a round trip through uint8 would cost 10 %
