"""Data sets as random-access stores of examples: TFDS data sets, image folders, the generated stand-in.

The input pipeline (pipeline.py) asks a store for the examples at given
indices, so every worker reads only the examples of its own slice of each global
batch, and the order can be a pure function of (seed, epoch) that does not depend
on the number of workers or replicas. Two kinds of store:

- `RandomAccessStore`: a TFDS data set prepared as ArrayRecord files (what this
  launcher prepares, CIFAR-10 and the generated stand-in included), read example by
  example through `builder.as_data_source`; decoded examples are kept in memory as
  they are first read, so a worker decodes each of its examples once.
- `InMemoryStore`: the whole split decoded into memory once, read with a graph-only
  gather. For image folders (each file is checked on the way), TFDS data sets
  already prepared as TFRecord files, and TPUs (whose input pipelines run on the TPU
  hosts, where Python cannot).

`data.source` picks where the examples come from (SOURCES): `tfds` (data.dataset
through TFDS), `image_folder` (data.image_folder) or `generated` (the stand-in).
Generated stand-in data lives in a directory of its own
(`generated_cifar10.generated_data_dir`), never in a TFDS data_dir that real data
could share, and a real-data run refuses a data_dir that holds generated data. A new
source is a function (data config, work directory, random access) -> Source, one line
in SOURCES, its name in config.Source and the keys it reads in DataConfig.

    python -c "from resnet18.data import sources; help(sources.prepare_source)"
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
import urllib.error
import urllib.request
from typing import Callable, Protocol

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet18.data import generated_cifar10
from resnet18.config import DataConfig
from resnet18.registry import lookup
from resnet18.runtime.errors import SetupError, first_line
from resnet18.runtime.files import file_in_the_way

# TFDS suggests OpenCV on every worker's first decode; PIL decodes these small images well enough.
logging.getLogger("absl").addFilter(lambda record: "OpenCV is not installed" not in record.getMessage())
IN_MEMORY_LIMIT_BYTES = 1 << 30  # decoded splits up to this size may be held as a graph constant
REACHABLE_TIMEOUT_SECONDS = 15
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# What preparing a data set raises when the data cannot be had here: no network, a wrong or missing
# manual download (TFDS says so with an AssertionError), a bad archive.
PREPARATION_ERRORS = (OSError, AssertionError, tfds.core.download.download_manager.NonMatchingChecksumError,
                      tfds.core.download.util.DownloadError, tfds.core.download.extractor.ExtractError)
CIFAR10_MANUAL_HELP = """\
CIFAR-10 is not prepared in {data_dir} and could not be downloaded ({reason}).
To prepare it offline: copy cifar-10-binary.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html,
170052171 bytes, sha256 c4a38c50...bca1dd) into a folder and run again with
  --set data.manual_dir=/path/to/that/folder
or point --set data.data_dir=... at a TFDS data_dir where cifar10 is already prepared
(`tfds build cifar10 --data_dir DIR` on a machine with network, then copy DIR).
To try the launcher without CIFAR-10, run the offline smoke job: --job jobs/cpu_smoke.yaml"""


class ExampleStore(Protocol):
    """The examples of one split, by index."""

    num_examples: int

    def read(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(uint8 images [k, S, S, 3], int32 labels [k]) at int64 `indices` [k]; usable inside tf.data."""


class InMemoryStore:
    """A split decoded into memory; `read` is a graph-only gather (runs anywhere, TPU hosts included)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.num_examples = len(labels)
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int32)

    def read(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.gather(tf.constant(self.images), indices), tf.gather(tf.constant(self.labels), indices)


class RandomAccessStore:
    """A TFDS split in ArrayRecord files, read example by example; decoded examples are kept once read."""

    def __init__(self, data_source, image_size: int):
        self.num_examples = len(data_source)
        self._source = data_source
        self._size = image_size
        self._images = np.zeros([self.num_examples, image_size, image_size, 3], np.uint8)
        self._labels = np.zeros([self.num_examples], np.int32)
        self._have = np.zeros([self.num_examples], bool)
        self._lock = threading.Lock()
        self.decoded = 0  # examples decoded so far (each at most once)

    def _fetch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            missing = np.unique(indices[~self._have[indices]])
            if missing.size:
                for index, example in zip(missing, self._source.__getitems__(missing.tolist())):
                    self._images[index] = _to_rgb(example["image"], self._size)
                    self._labels[index] = example["label"]
                self._have[missing] = True
                self.decoded += int(missing.size)
            return self._images[indices], self._labels[indices]

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every example, decoded (what an in-memory store holds)."""
        return self._fetch(np.arange(self.num_examples))

    def read(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = tf.numpy_function(self._fetch, [indices], [tf.uint8, tf.int32], stateful=False)
        images.set_shape([None, self._size, self._size, 3])
        labels.set_shape([None])
        return images, labels


@dataclasses.dataclass(frozen=True)
class Source:
    """A prepared data set: its two splits and what they hold."""

    name: str
    train: ExampleStore
    test: ExampleStore
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return self.train.num_examples

    @property
    def num_test(self) -> int:
        return self.test.num_examples


def prepare_source(data: DataConfig, workdir: str, random_access: bool = True) -> Source:
    """Finds (and if needed prepares) the data set `data.source` names (SOURCES).

    `random_access=False` holds every split in memory as graph constants (TPU input pipelines).

    Raises:
      SetupError: the data set is missing, cannot be prepared here, or holds bad images (exit 2).
    """
    if data.data_dir and (problem := file_in_the_way(data.data_dir)):  # was a NotADirectoryError traceback
        raise SetupError(f"data.data_dir {problem}")
    tfds.disable_progress_bar()  # one line per step of preparation, not a redrawn bar
    return lookup(SOURCES, data.source, "data.source")(data, workdir, random_access)


def tfds_source(data: DataConfig, workdir: str, random_access: bool) -> Source:  # noqa: ARG001
    """data.dataset through TFDS in data.data_dir, downloaded and prepared on first use."""
    if data.data_dir and generated_cifar10.holds_generated_data(data.data_dir):
        raise SetupError(f"data.data_dir {data.data_dir!r} holds generated stand-in data, not the real "
                         f"{data.dataset}; point it at a real TFDS data_dir (or set data.source: generated to train "
                         "on the stand-in)")
    with _preparation_lock(data.data_dir):  # workers sharing a file system take turns: the first prepares
        builder = _prepared_builder(data, data.data_dir)
    return _tfds_source(builder, data, random_access)


def generated_source(data: DataConfig, workdir: str, random_access: bool) -> Source:
    """The stand-in: written in CIFAR-10's binary format, prepared by the real TFDS builder in its own data_dir."""
    generated = data.generated
    data_dir = generated_cifar10.generated_data_dir(data.data_dir or os.path.join(workdir, "generated_data"),
                                                    generated.train_examples, generated.test_examples)
    with _preparation_lock(data_dir):
        try:
            generated_cifar10.prepare(data_dir, generated.train_examples, generated.test_examples)
        except ValueError as error:
            raise SetupError(f"data.generated: {error}") from None
        builder = _prepared_builder(data, data_dir)
    return _tfds_source(builder, data, random_access)


def folder_source(data: DataConfig, workdir: str, random_access: bool) -> Source:  # noqa: ARG001
    """data.image_folder: train/<class>/* and test/<class>/*, decoded into memory once."""
    return image_folder_source(data.image_folder, data.image_size)


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


def _prepared_builder(data: DataConfig, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        builder = tfds.builder(data.dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise SetupError(f"data.dataset {data.dataset!r} is not a TFDS data set name (see `tfds.list_builders()`), "
                         "or use data.image_folder for your own images") from None
    if tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        return builder
    try:
        if not _has_manual_download(builder, data.manual_dir):
            _check_reachable(builder)
        # ArrayRecord: random access, so each worker reads only its own examples.
        builder.download_and_prepare(file_format="array_record",
                                     download_config=tfds.download.DownloadConfig(manual_dir=data.manual_dir))
    except PREPARATION_ERRORS as error:  # network, checksum, manual folder: what the user can fix; bugs go through
        reason = first_line(error)
        if data.dataset == "cifar10":
            raise SetupError(CIFAR10_MANUAL_HELP.format(data_dir=builder.data_dir, reason=reason)) from None
        raise SetupError(f"data set {data.dataset!r} is not prepared in {builder.data_dir} and preparing it failed: "
                         f"{reason}. Prepare it with `tfds build {data.dataset}` and pass --set data.data_dir=DIR"
                         ) from None
    return builder


def _has_manual_download(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> bool:
    """Whether every registered download of the data set already lies in `manual_dir`."""
    url_infos = builder.url_infos or {}
    return bool(manual_dir and url_infos) and all(
        info.filename and os.path.exists(os.path.join(manual_dir, info.filename)) for info in url_infos.values())


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


def _tfds_source(builder: tfds.core.DatasetBuilder, data: DataConfig, random_access: bool) -> Source:
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise SetupError(f"data set {data.dataset!r} has no 'image' and 'label' features; it is not an "
                         "image-classification data set")
    splits = builder.info.splits
    test_split = next((split for split in ("test", "validation") if split in splits), None)
    if "train" not in splits or test_split is None:
        raise SetupError(f"data set {data.dataset!r} needs a 'train' and a 'test' (or 'validation') split; "
                         f"it has {list(splits)}")
    array_record = str(builder.info.file_format).lower().endswith("array_record")

    def store(split: str) -> ExampleStore:
        if not array_record:
            return _decode_whole_split(builder, split, data.image_size, splits[split].num_examples)
        random = RandomAccessStore(builder.as_data_source(split=split), data.image_size)
        if random_access:
            return random
        _check_fits_in_memory(builder, split, data.image_size, random.num_examples)
        images, labels = random.read_all()  # TPU hosts: graph constants
        return InMemoryStore(images, labels)

    return Source(data.dataset, store("train"), store(test_split), tuple(features["label"].names))


def _check_fits_in_memory(builder: tfds.core.DatasetBuilder, split: str, image_size: int, count: int) -> None:
    decoded_bytes = count * image_size * image_size * 3
    if decoded_bytes > IN_MEMORY_LIMIT_BYTES:
        raise SetupError(
            f"the {split} split of {builder.name} is {decoded_bytes / 2**30:.1f} GiB decoded: too large to hold in "
            f"memory (TFRecord files, which cannot be read by index, or a TPU, whose hosts hold the data as graph "
            f"constants). Prepare it as ArrayRecord: `tfds build {builder.name} --file_format=array_record "
            "--data_dir DIR`; on a TPU, use a smaller data set or image size")


def _decode_whole_split(builder: tfds.core.DatasetBuilder, split: str, image_size: int, count: int) -> InMemoryStore:
    _check_fits_in_memory(builder, split, image_size, count)
    images = np.zeros([count, image_size, image_size, 3], np.uint8)
    labels = np.zeros([count], np.int32)
    for index, example in enumerate(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))):
        images[index] = _to_rgb(example["image"], image_size)
        labels[index] = example["label"]
    return InMemoryStore(images, labels)


def _to_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 image of `size` x `size` (grey expanded, other sizes resized with antialiasing)."""
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[0] != size or image.shape[1] != size:
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return image


def image_folder_source(root: str, image_size: int) -> Source:
    """ROOT/train/<class>/* and ROOT/test/<class>/*, every image checked and decoded once.

    Raises:
      SetupError: a split or its class folders are missing, or images do not decode (each named).
    """
    if not os.path.isdir(root):
        raise SetupError(f"data.image_folder {root!r} is not a directory")
    missing = [split for split in ("train", "test") if not os.path.isdir(os.path.join(root, split))]
    if missing:
        raise SetupError(f"data.image_folder {root!r} needs train/<class>/* and test/<class>/* folders; "
                         f"missing: {missing}")
    class_names = tuple(sorted(name for name in os.listdir(os.path.join(root, "train"))
                               if os.path.isdir(os.path.join(root, "train", name)) and not name.startswith(".")))
    if not class_names:
        raise SetupError(f"data.image_folder {root!r}: train/ holds no class folders; put each class's images in "
                         "train/<class>/ (and test/<class>/)")
    files = {split: _image_files(root, split, class_names) for split in ("train", "test")}
    empty = [split for split, found in files.items() if not found]
    if empty:
        raise SetupError(f"data.image_folder {root!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders "
                         f"of {empty}")
    stores, bad = {}, []
    for split, found in files.items():
        images = np.zeros([len(found), image_size, image_size, 3], np.uint8)
        for index, (path, _) in enumerate(found):
            try:
                images[index] = _read_image(path, image_size)
            except Exception as error:  # any decoding failure: named below, the run does not start
                bad.append(f"{path} ({first_line(error)})")
        stores[split] = InMemoryStore(images, np.array([label for _, label in found], np.int32))
    if bad:
        listed = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise SetupError(f"data.image_folder {root!r}: {len(bad)} file(s) are not readable images; fix or remove "
                         f"them:\n  {listed}")
    return Source(os.path.basename(os.path.normpath(root)), stores["train"], stores["test"], class_names)


def _image_files(root: str, split: str, class_names: tuple[str, ...]) -> list[tuple[str, int]]:
    found = []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, split, name)
        if os.path.isdir(folder):
            found += [(os.path.join(folder, file), label) for file in sorted(os.listdir(folder))
                      if file.lower().endswith(IMAGE_SUFFIXES) and not file.startswith(".")]
    return found


def _read_image(path: str, image_size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # decodes fully: a truncated file fails here, not mid-training
        return _to_rgb(np.asarray(image.convert("RGB")), image_size)


# data.source -> the function that prepares it: (data config, work directory, random access) -> Source.
SOURCES: dict[str, Callable[[DataConfig, str, bool], Source]] = {
    "tfds": tfds_source,
    "generated": generated_source,
    "image_folder": folder_source,
}
