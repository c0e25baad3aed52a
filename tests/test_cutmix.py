"""CutMix: targets match the pixels actually pasted, seeds decide everything, tf.data keeps shapes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from resnet18.data.cutmix import cutmix

NUM_CLASSES = 10


def seed(a: int, b: int = 0) -> tf.Tensor:
    return tf.constant([a, b], tf.int64)


def indexed_batch(batch: int = 8, height: int = 16, width: int = 12) -> tuple[tf.Tensor, tf.Tensor]:
    """Example i is the constant image i + 1 with label i, so every pixel names its source."""
    values = np.arange(1, batch + 1, dtype=np.float32)[:, None, None, None]
    images = np.broadcast_to(values, (batch, height, width, 3)).copy()
    return tf.constant(images), tf.range(batch)


def test_targets_match_pasted_pixels():
    # Tall images (16x8) so a swapped height/width shows in the box shape.
    height, width = 16, 8
    images, labels = indexed_batch(height=height, width=width)
    saw_partial_mix, saw_inner_box = False, False
    partners_seen = [set() for _ in range(len(labels))]
    for draw in range(20):
        mixed, targets = cutmix(images, labels, NUM_CLASSES, seed(draw))
        mixed, targets = mixed.numpy(), targets.numpy()
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
        assert (targets >= 0).all()
        boxes, partners = set(), []
        for i in range(len(mixed)):
            assert np.count_nonzero(targets[i]) <= 2, targets[i]
            assert (mixed[i] == mixed[i, :, :, :1]).all(), "channels of one pixel come from different examples"
            changed = mixed[i, :, :, 0] != i + 1
            own_weight = targets[i, i]
            # Every other example differs from example i everywhere, so the changed
            # fraction is exactly the pasted area.
            assert changed.mean() == pytest.approx(1.0 - own_weight, abs=1e-6)
            if not changed.any():
                assert own_weight == 1.0
                partners.append(i)  # its own partner, or an empty box
                continue
            saw_partial_mix |= own_weight > 0
            sources = np.unique(mixed[i, :, :, 0][changed])
            assert len(sources) == 1, f"example {i} got pixels from several partners: {sources}"
            partner = int(sources[0]) - 1
            partners.append(partner)
            partners_seen[i].add(partner)
            assert targets[i, partner] == pytest.approx(1.0 - own_weight, abs=1e-6)
            rows, cols = np.nonzero(changed)
            box = (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
            assert changed[box[0]:box[1], box[2]:box[3]].all(), "pasted region is not a rectangle"
            boxes.add(box)
        assert len(boxes) <= 1, f"one box per batch expected, got {boxes}"
        if boxes:
            assert sorted(partners) == list(range(len(mixed))), f"partners are not a permutation: {partners}"
            top, bottom, left, right = boxes.pop()
            if top > 0 and left > 0 and bottom < height and right < width:
                # An unclipped box is floor(H * r) by floor(W * r) for one r = sqrt(1 - lam).
                saw_inner_box = True
                r_from_rows = ((bottom - top) / height, (bottom - top + 1) / height)
                r_from_cols = ((right - left) / width, (right - left + 1) / width)
                assert max(r_from_rows[0], r_from_cols[0]) < min(r_from_rows[1], r_from_cols[1]), boxes
    assert saw_partial_mix and saw_inner_box, "no draw exercised the checks"
    # Partners are adjacent pairs (the batch order is already random): the same within a replica's
    # batch whatever the number of replicas (tests/test_data.py checks that invariance end to end).
    assert partners_seen == [{i ^ 1} for i in range(len(labels))], partners_seen


def test_probability_zero_returns_batch_unchanged():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (6, 8, 8, 3)), tf.uint8)
    labels = tf.constant(rng.integers(0, NUM_CLASSES, 6))
    for draw in range(5):
        mixed, targets = cutmix(images, labels, NUM_CLASSES, seed(draw), probability=0.0)
        assert mixed.dtype == tf.float32 and mixed.shape == images.shape
        np.testing.assert_array_equal(mixed.numpy(), images.numpy().astype(np.float32))
        np.testing.assert_array_equal(targets.numpy(), tf.one_hot(labels, NUM_CLASSES).numpy())


def test_probability_is_one_draw_per_batch():
    images, labels = indexed_batch()
    mixed_batches = 0
    for draw in range(100):
        mixed, _ = cutmix(images, labels, NUM_CLASSES, seed(draw), probability=0.5)
        mixed_batches += int(tf.reduce_any(mixed != images))
    # Binomial(100, 0.5 * P(box non-empty and permutation not identity)) -- well inside.
    assert 25 <= mixed_batches <= 70, mixed_batches


def random_batch(batch: int = 64) -> tuple[tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(1)
    images = tf.constant(rng.uniform(0, 255, (batch, 32, 32, 3)), tf.float32)
    return images, tf.constant(rng.integers(0, NUM_CLASSES, batch))


def test_same_seed_same_output_different_seed_different_output():
    images, labels = random_batch()
    first = cutmix(images, labels, NUM_CLASSES, seed(7, 3))
    again = cutmix(images, labels, NUM_CLASSES, seed(7, 3))
    other = cutmix(images, labels, NUM_CLASSES, seed(8, 3))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())
    assert not np.array_equal(first[1].numpy(), other[1].numpy())


def test_every_draw_depends_only_on_the_seed():
    # probability 0.5 so the Bernoulli draw itself is exercised too.
    images, labels = random_batch(16)
    for draw in range(10):
        first = cutmix(images, labels, NUM_CLASSES, seed(draw), probability=0.5)
        again = cutmix(images, labels, NUM_CLASSES, seed(draw), probability=0.5)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_label_weight_distribution_with_alpha_one():
    """Mean own-label weight over 200 batches matches the paper's box sampling.

    lam ~ Beta(1, 1) has mean 0.5, but the box is clipped at the image edge, so
    less than (1 - lam) is pasted: on 32x32 images the weight lam_adj has mean
    0.690 and standard deviation 0.186 (numpy simulation of the same sampling,
    100,000 draws). 200 draws put the sample mean within +-0.013 (one standard
    error) of that.
    """
    # Labels 0..7 are all distinct, so min over examples of the own-label weight is
    # lam_adj unless the permutation is the identity (1 in 40320).
    batch = 8
    images = tf.zeros([batch, 32, 32, 1])
    labels = tf.range(batch)

    @tf.function
    def lam_adj(draw_seed: tf.Tensor) -> tf.Tensor:
        _, targets = cutmix(images, labels, NUM_CLASSES, draw_seed)
        return tf.reduce_min(tf.gather(targets, labels, axis=1, batch_dims=1))

    weights = np.array([lam_adj(seed(draw, 11)).numpy() for draw in range(200)])
    assert 0.63 <= weights.mean() <= 0.75, weights.mean()
    assert 0.13 <= weights.std() <= 0.24, weights.std()
    assert weights.min() < 0.4 and weights.max() > 0.95


def test_inside_tf_data_keeps_static_shapes():
    images, labels = random_batch(16)
    dataset = tf.data.Dataset.from_tensors((images, labels)).map(
        lambda xs, ys: cutmix(xs, ys, NUM_CLASSES, tf.constant([1, 2], tf.int64)))
    image_spec, target_spec = dataset.element_spec
    assert image_spec.shape.as_list() == [16, 32, 32, 3] and image_spec.dtype == tf.float32
    assert target_spec.shape.as_list() == [16, NUM_CLASSES] and target_spec.dtype == tf.float32
    # The traced graph computes what the eager call does.
    graph_images, graph_targets = next(iter(dataset))
    eager_images, eager_targets = cutmix(images, labels, NUM_CLASSES, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(graph_images.numpy(), eager_images.numpy())
    np.testing.assert_array_equal(graph_targets.numpy(), eager_targets.numpy())


def test_unknown_batch_size_inside_tf_data():
    images, labels = random_batch(10)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4).map(
        lambda xs, ys: cutmix(xs, ys, NUM_CLASSES, tf.constant([1, 2], tf.int64)))
    image_spec, target_spec = dataset.element_spec
    assert image_spec.shape.as_list() == [None, 32, 32, 3]
    assert target_spec.shape.as_list() == [None, NUM_CLASSES]
    assert [int(i.shape[0]) for i, _ in dataset] == [4, 4, 2]


def test_batch_size_known_only_from_labels_is_kept():
    trace = tf.function(lambda xs, ys: cutmix(xs, ys, NUM_CLASSES, seed(0))).get_concrete_function(
        tf.TensorSpec([None, 32, 32, 3], tf.float32), tf.TensorSpec([16], tf.int32))
    image_shape, target_shape = (output.shape.as_list() for output in trace.structured_outputs)
    assert image_shape == [16, 32, 32, 3] and target_shape == [16, NUM_CLASSES]


@pytest.mark.parametrize("kwargs, message", [({"alpha": 0.0}, "alpha must be > 0"),
                                             ({"probability": 1.5}, r"probability must be in \[0, 1\]")])
def test_bad_arguments_are_named(kwargs, message):
    images, labels = indexed_batch(2)
    with pytest.raises(ValueError, match=message):
        cutmix(images, labels, NUM_CLASSES, seed(0), **kwargs)
