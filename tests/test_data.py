"""Data: sources, a global order independent of workers and replicas, exact-once evaluation, augmentation."""

from __future__ import annotations

import os
import tarfile
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet18.data import generated_cifar10, sources
from resnet18.data import pipeline as input_pipeline
from resnet18.data.augment import AUGMENTATIONS, Augmentation, crop_flip
from resnet18.config import DataConfig
from resnet18.runtime.errors import SetupError
from tests.conftest import REPO as REPO_ROOT
from tests.conftest import TINY_JOB, TINY_TEST, TINY_TRAIN, run_launcher

GENERATED = {"train_examples": TINY_TRAIN, "test_examples": TINY_TEST}


def train_fn(source, data: DataConfig, global_batch: int, **options):
    """The training dataset function with the data config's own augmentation."""
    return input_pipeline.train_dataset_fn(source, data, AUGMENTATIONS[data.augmentation], global_batch, **options)


def context(pipelines: int, pipeline_id: int, replicas: int | None = None) -> tf.distribute.InputContext:
    return tf.distribute.InputContext(pipelines, pipeline_id, replicas or pipelines)


def tiny_data(**changes) -> DataConfig:
    from resnet18.config import GeneratedDataConfig

    return DataConfig(source="generated", generated=GeneratedDataConfig(**GENERATED), **changes)


@pytest.fixture(scope="module")
def source(tiny_data_dir):
    return sources.prepare_source(tiny_data(data_dir=tiny_data_dir), "/unused")


def global_batches(source, data: DataConfig, batch: int, pipelines: int, replicas: int, steps: int,
                   start_step: int = 0, epochs: int = 2, seed: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `steps` global batches, each put together from every pipeline's replica batches in order."""
    fn = train_fn(source, data, batch, epochs=epochs, seed=seed, start_step=start_step)
    per_pipeline = replicas // pipelines
    streams = [iter(fn(context(pipelines, index, replicas))) for index in range(pipelines)]
    result = []
    for _ in range(steps):
        parts = [next(stream) for stream in streams for _ in range(per_pipeline)]
        result.append((np.concatenate([images.numpy() for images, _ in parts]),
                       np.concatenate([labels.numpy() for _, labels in parts])))
    return result


def test_generated_data_is_prepared_by_the_real_cifar10_builder_as_array_record(source, tiny_data_dir):
    assert isinstance(source.train, sources.RandomAccessStore)
    assert (source.num_train, source.num_test) == (TINY_TRAIN, TINY_TEST)
    assert source.class_names[:2] == ("airplane", "automobile")
    prepared = generated_cifar10.generated_data_dir(tiny_data_dir, TINY_TRAIN, TINY_TEST)
    assert tfds.builder("cifar10", data_dir=prepared).info.file_format.value == "array_record"


@pytest.mark.parametrize("pipelines, replicas", [(1, 2), (2, 2), (2, 4), (4, 4)])
def test_a_global_batch_is_the_same_whatever_the_workers_and_replicas(source, pipelines, replicas):
    # Augmentation on: even the random crops and flips must not depend on the split.
    data = DataConfig(augmentation="crop_flip")
    alone = global_batches(source, data, 64, 1, 1, steps=3)
    split = global_batches(source, data, 64, pipelines, replicas, steps=3)
    for (images, labels), (split_images, split_labels) in zip(alone, split):
        np.testing.assert_array_equal(split_labels, labels)
        np.testing.assert_array_equal(split_images, images)


def test_cutmix_is_the_same_whatever_the_replicas_when_their_batches_are_even(source):
    data = DataConfig(augmentation="crop_flip", cutmix_prob=1.0)
    one = global_batches(source, data, 64, 1, 1, steps=2)
    four = global_batches(source, data, 64, 2, 4, steps=2)
    for (images, targets), (other_images, other_targets) in zip(one, four):
        assert targets.ndim == 2 and not np.all(targets.max(axis=1) == 1.0)  # really mixed
        np.testing.assert_array_equal(other_targets, targets)
        np.testing.assert_array_equal(other_images, images)


def test_each_epoch_is_a_permutation_and_each_pipeline_reads_only_its_examples(tiny_data_dir):
    source = sources.prepare_source(tiny_data(data_dir=tiny_data_dir), "/unused")  # fresh stores: nothing read yet
    steps = TINY_TRAIN // 64
    fn = train_fn(source, DataConfig(augmentation="none"), 64, epochs=1, seed=0)
    batches = list(fn(context(2, 1, 2)).as_numpy_iterator())  # the second of two workers
    assert len(batches) == steps
    read = source.train.decoded
    assert read == steps * 32  # its half of every global batch, each example decoded once, nothing else
    whole = global_batches(source, DataConfig(augmentation="none"), 64, 1, 1, steps=steps, epochs=1, seed=0)
    keys = {image.tobytes() for images, _ in whole for image in images}
    assert len(keys) == steps * 64  # no example twice in an epoch


def test_training_order_is_deterministic_resumable_and_changes_with_seed_and_epoch(source):
    def labels(start_step=0, seed=5):
        fn = train_fn(source, DataConfig(), 64, epochs=2, seed=seed, start_step=start_step)
        return [batch_labels for _, batch_labels in fn(context(1, 0)).as_numpy_iterator()]

    full = labels()
    assert len(full) == 2 * (TINY_TRAIN // 64)
    assert all(np.array_equal(a, b) for a, b in zip(full, labels()))
    resumed = labels(start_step=13)  # mid-epoch 2
    assert len(resumed) == len(full) - 13
    assert all(np.array_equal(a, b) for a, b in zip(full[13:], resumed))
    assert not all(np.array_equal(a, b) for a, b in zip(full, labels(seed=6)))
    assert not np.array_equal(np.concatenate(full[:10]), np.concatenate(full[10:20]))  # epochs differ


@pytest.mark.parametrize("global_batch, pipelines, replicas", [(64, 1, 1), (48, 2, 2), (96, 1, 2), (30, 3, 3),
                                                               (512, 2, 4)])
def test_evaluation_counts_every_example_exactly_once(source, global_batch, pipelines, replicas):
    fn = input_pipeline.ordered_dataset_fn(source.test, global_batch)
    steps = input_pipeline.eval_steps(source.num_test, global_batch)
    seen = []
    for pipeline in range(pipelines):
        batches = list(fn(context(pipelines, pipeline, replicas)).as_numpy_iterator())
        assert len(batches) == steps * replicas // pipelines  # every replica gets the same number of steps
        for images, _, mask in batches:
            assert images.shape[0] == global_batch // replicas
            seen.extend(image.tobytes() for image in images[mask == 1])
    every = {image.tobytes() for images, _ in input_pipeline.whole_split(source.test).as_numpy_iterator()
             for image in images}
    assert len(seen) == TINY_TEST and set(seen) == every


def test_our_pipelines_run_without_the_tf_data_autotuner(source):
    # Its model thread can sleep through an iterator's deletion (up to 60 s at the end of a run):
    # the pipelines use fixed parallelism instead (input_pipeline.PARALLEL_BATCHES).
    train = train_fn(source, tiny_data(), 64, epochs=1, seed=0)(context(1, 0))
    evaluation = input_pipeline.ordered_dataset_fn(source.test, 64)(context(1, 0))
    for dataset in (train, evaluation, input_pipeline.whole_split(source.test)):
        assert dataset.options().autotune.enabled is False


def test_a_tasks_augmentation_keeps_autograph_inside_our_pipeline(source):
    # The pipeline's own functions are traced as written (resnet18/autograph.py); an augmentation is
    # a seam, converted as any tf.function would convert it, so its tensor-dependent `if` works.
    def inverted(images, uniforms):  # noqa: ARG001 - an augmentation's signature
        images = tf.cast(images, tf.float32)
        if tf.reduce_min(images) >= 0.0:  # a tensor: only AutoGraph makes this a tf.cond
            images = 255.0 - images
        return images

    def first_batch(augmentation):
        fn = input_pipeline.train_dataset_fn(source, tiny_data(), augmentation, 64, epochs=1, seed=0)
        return next(iter(fn(context(1, 0))))

    (images, labels), (plain, plain_labels) = (first_batch(Augmentation("inverted", 0, inverted)),
                                               first_batch(AUGMENTATIONS["none"]))
    np.testing.assert_array_equal(labels, plain_labels)
    np.testing.assert_array_equal(images, 255.0 - plain.numpy())  # exact: integers in float32


def test_crop_flip_is_an_exact_shift_and_flip():
    images = tf.cast(tf.reshape(tf.range(2 * 8 * 8 * 3) % 251, [2, 8, 8, 3]), tf.uint8)
    out = crop_flip(images, tf.random.stateless_uniform([2, 3], [1, 2]), padding=2).numpy()
    assert np.array_equal(out, np.round(out))  # nearest neighbour: exact pixel values
    original = images.numpy()
    for index in range(2):
        matches = []
        for flip in (False, True):
            base = original[index, :, ::-1] if flip else original[index]
            padded = np.pad(base, ((2, 2), (2, 2), (0, 0)))
            matches += [(dy, dx) for dy in range(5) for dx in range(5)
                        if np.array_equal(padded[dy:dy + 8, dx:dx + 8], out[index])]
        assert matches, "output is not a shifted (and possibly flipped) copy of the input"


@pytest.mark.parametrize("name", ["crop_flip", "rotate_shift_zoom_flip", "none"])
def test_augmentations_keep_shape_and_follow_their_random_numbers(name):
    images = tf.cast(tf.random.stateless_uniform([4, 32, 32, 3], [1, 2], 0, 255, tf.int32), tf.uint8)
    augmentation = AUGMENTATIONS[name]
    uniforms = tf.random.stateless_uniform([4, max(augmentation.num_params, 1)], [3, 4])
    first = augmentation.apply(images, uniforms)
    again = augmentation.apply(images, uniforms)
    other = augmentation.apply(images, tf.random.stateless_uniform([4, max(augmentation.num_params, 1)], [3, 5]))
    assert first.shape == images.shape and first.dtype == tf.float32
    assert 0 <= float(tf.reduce_min(first)) and float(tf.reduce_max(first)) <= 255
    assert np.array_equal(first, again)
    assert np.array_equal(first, tf.cast(images, tf.float32)) == (name == "none")
    assert np.array_equal(first, other) == (name == "none")


def write_image_folder(root, sizes=(40, 48), counts=(("train", 6), ("test", 4))) -> None:
    rng = np.random.default_rng(0)
    for split, count in counts:
        for label in ("cats", "dogs"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count // 2):
                image = rng.integers(0, 255, size=(*sizes, 3), dtype=np.uint8)
                (folder / f"{index}.png").write_bytes(tf.io.encode_png(image).numpy())


def test_image_folder_of_other_sizes_is_resized(tmp_path):
    write_image_folder(tmp_path)
    source = sources.prepare_source(DataConfig(source="image_folder", image_folder=str(tmp_path)), "/unused")
    assert source.class_names == ("cats", "dogs") and (source.num_train, source.num_test) == (6, 4)
    fn = train_fn(source, DataConfig(source="image_folder", image_folder=str(tmp_path)), 2, epochs=1, seed=0)
    images, labels = next(fn(context(1, 0)).as_numpy_iterator())
    assert images.shape == (2, 32, 32, 3) and set(labels) <= {0, 1}


def test_an_image_folder_with_bad_files_names_each_of_them_before_training(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "train" / "cats" / "x.png").write_text("this is not a PNG")
    good = (tmp_path / "test" / "dogs" / "0.png").read_bytes()
    (tmp_path / "test" / "dogs" / "cut.png").write_bytes(good[:len(good) // 2])  # a truncated PNG
    with pytest.raises(SetupError) as raised:
        sources.prepare_source(DataConfig(source="image_folder", image_folder=str(tmp_path)), "/unused")
    message = str(raised.value)
    assert "2 file(s) are not readable images" in message
    assert "train/cats/x.png" in message and "test/dogs/cut.png" in message


@pytest.mark.parametrize("layout, words", [
    (["train/a"], "missing: ['test']"),
    (["train", "test"], "train/ holds no class folders"),
    (["train/a", "test/a"], "no images"),
])
def test_an_image_folder_missing_its_parts_says_which(tmp_path, layout, words):
    for folder in layout:
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(SetupError) as raised:
        sources.prepare_source(DataConfig(source="image_folder", image_folder=str(tmp_path)), "/unused")
    assert words in str(raised.value)


def test_unknown_dataset_name_is_a_setup_error():
    with pytest.raises(SetupError, match="not a TFDS data set name"):
        sources.prepare_source(DataConfig(dataset="no_such_dataset_xyz"), "/unused")


@pytest.mark.parametrize("source", ["generated", "tfds"])
def test_a_data_dir_that_is_a_file_is_a_setup_error_naming_the_key(tmp_path, source):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for data_dir, words in ((afile, "is a file, not a directory"), (afile / "tfds", "lies under the file")):
        with pytest.raises(SetupError, match=f"data.data_dir '{data_dir}' {words}"):  # was NotADirectoryError
            sources.prepare_source(DataConfig(source=source, data_dir=str(data_dir)), str(tmp_path / "run"))


def test_generated_archive_has_the_cifar10_binary_layout(tmp_path):
    path = tmp_path / "cifar-10-binary.tar.gz"
    generated_cifar10.write_archive(str(path), 50, 20, seed=0)
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


OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}  # no traffic leaves this machine
REAL_DATA = ("data.source=tfds", "data.generated.train_examples=0", "data.generated.test_examples=0")


def test_missing_cifar10_offline_exits_2_with_instructions(tmp_path):
    started = time.monotonic()
    result = run_launcher("--job", TINY_JOB, "--set", *REAL_DATA, f"data.data_dir={tmp_path / 'tfds'}",
                          f"data.manual_dir={tmp_path / 'manual'}", "--workdir", str(tmp_path / "run"),
                          env=OFFLINE, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "cifar-10-binary.tar.gz" in result.stderr and "data.manual_dir" in result.stderr
    assert "Traceback" not in result.stderr
    # Within seconds (TensorFlow's import included), not after TFDS's 3.5 minutes of download retries.
    assert time.monotonic() - started < 30


def test_generated_data_never_stands_in_for_real_cifar10(tiny_data_dir, tmp_path):
    # The same data_dir the generated runs use: a real-data run must not find the stand-in there.
    beside = run_launcher("--job", TINY_JOB, "--set", *REAL_DATA, f"data.data_dir={tiny_data_dir}",
                          "--workdir", str(tmp_path / "beside"), env=OFFLINE, timeout=300)
    assert beside.returncode == 2 and "could not be downloaded" in beside.stderr, beside.stderr[-2000:]
    inside = generated_cifar10.generated_data_dir(tiny_data_dir, TINY_TRAIN, TINY_TEST)
    pointed = run_launcher("--job", TINY_JOB, "--set", *REAL_DATA, f"data.data_dir={inside}",
                           "--workdir", str(tmp_path / "inside"), env=OFFLINE, timeout=300)
    assert pointed.returncode == 2 and "holds generated stand-in data" in pointed.stderr, pointed.stderr[-2000:]
    assert not (tmp_path / "beside" / "checkpoints").exists() and not (tmp_path / "inside" / "checkpoints").exists()


def test_a_tpu_holds_each_split_in_memory_with_the_same_examples(tiny_data_dir, source):
    # TPU input pipelines run on the TPU hosts, where Python cannot: the data become graph constants.
    in_memory = sources.prepare_source(tiny_data(data_dir=tiny_data_dir), "/unused", random_access=False)
    assert isinstance(in_memory.train, sources.InMemoryStore) and in_memory.num_test == TINY_TEST
    indices = tf.constant([5, 0, 639, 17], tf.int64)
    for (images, labels), (other_images, other_labels) in [(in_memory.train.read(indices), source.train.read(indices))]:
        np.testing.assert_array_equal(images, other_images)
        np.testing.assert_array_equal(labels, other_labels)


def test_prepare_readies_a_jobs_data_where_a_run_will_find_it(tiny_data_dir, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, "-m", "launcher.prepare", "--job", TINY_JOB, "--set",
                             f"data.data_dir={tiny_data_dir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Prepared cifar10: {TINY_TRAIN} training and {TINY_TEST} test examples, 10 classes" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "launcher.prepare", "--job", TINY_JOB, "--set", *REAL_DATA,
                              f"data.data_dir={tmp_path / 'tfds'}"], cwd=REPO, capture_output=True, text=True,
                             timeout=300, env={**os.environ, **OFFLINE})
    assert missing.returncode == 2 and "CIFAR-10 is not prepared" in missing.stderr


def test_prepare_without_a_workdir_puts_the_stand_in_where_the_run_will_look(tmp_path):
    """The stand-in goes in the work directory; without --workdir, the run's is runs/NAME, and prepare's was '.'."""
    import subprocess
    import sys

    job = tmp_path / "small.yaml"
    job.write_text("name: small\ndata:\n  source: generated\n  generated: {train_examples: 20, test_examples: 10}\n")
    result = subprocess.run([sys.executable, "-m", "launcher.prepare", "--job", str(job)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "small" / "generated_data").is_dir() and not (tmp_path / "generated_data").exists()
