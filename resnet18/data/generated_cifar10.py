"""A learnable stand-in for CIFAR-10, in the real binary format, for offline runs.

CIFAR-10 cannot be downloaded everywhere (CI, air-gapped clusters). This module
writes `cifar-10-binary.tar.gz` exactly as the original is laid out
(`cifar-10-batches-bin/data_batch_{1..5}.bin`, `test_batch.bin`,
`batches.meta.txt`; records of 1 label byte + 3072 bytes, R, G, B planes) with
class-dependent patterns, so a model must learn to beat 10%. It is then
prepared by the real TFDS `cifar10` builder.

TFDS checks downloads against the checksum it ships for the real archive. The
generated archive is put where TFDS's download manager caches a *verified*
download (`<data_dir>/downloads/cifar10/<name derived from url and checksum>`),
so the unmodified builder extracts and prepares it (as ArrayRecord files, for
random access). Nothing inside the installed tensorflow_datasets package is
written (its `register_checksums=True` would rewrite `url_checksums/cifar10.txt`).

Because the prepared set is labelled `cifar10`, it must never share a TFDS
data_dir with the real one: the launcher always prepares it in a directory of
its own, `generated_data_dir(ROOT, ...)` = ROOT/generated-cifar10-<train>-<test>,
marked by a `generated.json`, and a real-data run refuses a data_dir so marked.

    python -m resnet18.data.generated_cifar10 --root /tmp/fake_tfds --train 3000 --test 1000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import numpy as np

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
TRAIN_FILES = 5
MARKER = "generated.json"


def make_examples(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [count, 32, 32, 3] uint8 and labels [count] with class-dependent patterns.

    Each class has its own colour tint and a spatial frequency/orientation;
    examples add noise, a random shift and a random brightness, so the task
    takes a few epochs to learn but is far above chance.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASS_NAMES)
    rng.shuffle(labels)
    class_rng = np.random.default_rng(12345)  # the class templates are the same for every split
    tints = class_rng.uniform(0.4, 0.6, size=(len(CLASS_NAMES), 3))
    angles = np.linspace(0, np.pi, len(CLASS_NAMES), endpoint=False)
    frequencies = 0.25 + 0.15 * (np.arange(len(CLASS_NAMES)) % 3)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    images = np.empty((count, *IMAGE_SHAPE), dtype=np.uint8)
    for index, label in enumerate(labels):
        shift_x, shift_y = rng.uniform(-4, 4, size=2)
        phase = (xx + shift_x) * np.cos(angles[label]) + (yy + shift_y) * np.sin(angles[label])
        pattern = 0.5 + 0.2 * np.sin(frequencies[label] * phase)
        brightness = rng.uniform(0.6, 1.4)
        image = pattern[..., None] * tints[label] * brightness
        image += rng.normal(0.0, 0.3, size=IMAGE_SHAPE)
        images[index] = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def to_cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: label byte, then the R, G and B 32x32 planes."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None], planes], axis=1).astype(np.uint8).tobytes()


def write_archive(path: str, train_examples: int, test_examples: int, seed: int = 0) -> None:
    """Writes a cifar-10-binary.tar.gz with the given numbers of examples."""
    train_images, train_labels = make_examples(train_examples, seed)
    test_images, test_labels = make_examples(test_examples, seed + 1)
    members = {"batches.meta.txt": ("\n".join(CLASS_NAMES) + "\n").encode()}
    for part, (images, labels) in enumerate(
        zip(np.array_split(train_images, TRAIN_FILES), np.array_split(train_labels, TRAIN_FILES)), start=1
    ):
        members[f"data_batch_{part}.bin"] = to_cifar_records(images, labels)
    members["test_batch.bin"] = to_cifar_records(test_images, test_labels)
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def generated_data_dir(root: str, train_examples: int, test_examples: int) -> str:
    """The directory of its own that a generated set of these sizes lives in, below `root`."""
    return os.path.join(root, f"generated-cifar10-{train_examples}-{test_examples}")


def holds_generated_data(data_dir: str) -> bool:
    """Whether `data_dir` is a generated stand-in's TFDS data_dir (not real data)."""
    return os.path.exists(os.path.join(data_dir, MARKER))


def prepare(data_dir: str, train_examples: int, test_examples: int, seed: int = 0) -> None:
    """Generates the archive and prepares it with the real TFDS cifar10 builder in `data_dir`.

    Idempotent: a data_dir already prepared with the same sizes and seed is reused;
    one prepared with other sizes is refused rather than silently mixed.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import resource

    wanted = {"train_examples": train_examples, "test_examples": test_examples, "seed": seed}
    marker_path = os.path.join(data_dir, MARKER)
    if os.path.exists(marker_path):
        with open(marker_path, encoding="utf-8") as stream:
            found = json.load(stream)
        if found == wanted:
            return
        raise ValueError(
            f"{data_dir} already holds generated CIFAR-10 data {found}, not {wanted}; use another data_dir"
        )
    tfds.disable_progress_bar()
    builder = tfds.builder("cifar10", data_dir=data_dir)
    expected = builder.url_infos[CIFAR10_URL]
    cache_dir = os.path.join(data_dir, "downloads", "cifar10")
    os.makedirs(cache_dir, exist_ok=True)
    archive_path = os.path.join(cache_dir, resource.get_dl_fname(CIFAR10_URL, expected.checksum))
    write_archive(archive_path, train_examples, test_examples, seed)
    with open(archive_path + ".INFO", "w", encoding="utf-8") as stream:
        json.dump({"urls": [CIFAR10_URL], "dataset_names": ["cifar10"],
                   "original_fname": expected.filename}, stream)
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    with open(marker_path, "w", encoding="utf-8") as stream:
        json.dump(wanted, stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder below which the generated data_dir is made")
    parser.add_argument("--train", type=int, default=3000, help="training examples")
    parser.add_argument("--test", type=int, default=1000, help="test examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data_dir = generated_data_dir(args.root, args.train, args.test)
    prepare(data_dir, args.train, args.test, args.seed)
    print(f"prepared generated cifar10 ({args.train} train, {args.test} test) in {data_dir}; train on it with "
          f"--set data.data_dir={args.root} data.generated.train_examples={args.train} "
          f"data.generated.test_examples={args.test}")


if __name__ == "__main__":
    main()
