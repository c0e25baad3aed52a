"""CutMix (Yun et al. 2019) on whole batches, as a stateless tf.data op.

CutMix pastes a rectangle from another example of the batch into each image
and mixes the one-hot targets in proportion to the pixels each image
contributes, so the model must recognise a class from part of an object and
cannot rely on a single discriminative patch.

As in the paper's reference code, one draw serves the whole batch: one
Bernoulli draw decides whether the batch is mixed, one lam ~ Beta(alpha, alpha)
sets the box area to (1 - lam) of the image and one box centre (uniform over the
image, box clipped to the image) places it. Partners are adjacent pairs (0 and 1,
2 and 3, ...) where the reference draws a permutation: the batch order is already
a random permutation of the data set, and pairs keep every example's partner
inside its replica's share of the global batch, so CutMix does the same to an
image whatever the number of replicas (an odd batch's last image keeps itself).
The target weight is taken from the box actually pasted after clipping, not from
lam, so labels always match pixels.

Only stateless random ops seeded by the `seed` argument are used, so the
result is a pure function of (images, labels, seed): a resumed run sees the
same batches as an uninterrupted one (see `resnet18.data`). The box is one
broadcast mask per batch, with no per-example loop, and static shapes are kept
so the op can sit inside `tf.data.Dataset.map` before a distributed step.

Note on the label weight: clipping the box at the image edge makes the pasted
area smaller than (1 - lam) on average, so with alpha=1 the mean own-label
weight is about 0.69 on 32x32 images, not 0.5 (the paper's code has the same
property).

    python -c "import resnet18.data.cutmix as c; help(c)"
"""

from __future__ import annotations

import tensorflow as tf


def cutmix(images: tf.Tensor, labels: tf.Tensor, num_classes: int, seed: tf.Tensor,
           alpha: float = 1.0, probability: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
    """Applies CutMix to a batch with probability `probability`.

    Args:
      images: [batch, height, width, channels] images, any scale; cast to float32.
      labels: [batch] integer class ids.
      num_classes: number of classes of the one-hot targets.
      seed: int64 shape-[2] seed for the stateless random ops.
      alpha: Beta(alpha, alpha) parameter of the kept fraction lam; > 0.
      probability: chance that the batch is mixed at all, in [0, 1].

    Returns:
      (images, targets): float32 images of the input shape, and float32
      [batch, num_classes] targets lam_adj * one_hot(label) +
      (1 - lam_adj) * one_hot(partner label), where lam_adj = 1 - pasted area /
      image area (1 when the batch is not mixed).

    Raises:
      ValueError: if alpha <= 0 or probability is outside [0, 1].
    """
    if not alpha > 0:
        raise ValueError(f"cutmix alpha must be > 0 (Beta(alpha, alpha)), got {alpha}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"cutmix probability must be in [0, 1], got {probability}")

    images = tf.convert_to_tensor(images)
    labels = tf.convert_to_tensor(labels)
    static_images_shape = images.shape
    static_batch = images.shape[:1].merge_with(labels.shape[:1])
    images = tf.cast(images, tf.float32)

    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    apply_seed, lam_seed, row_seed, col_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))

    # One Bernoulli draw per batch; a batch left alone gets an empty box and
    # lam_adj = 1, which yields the input images and one-hot targets exactly,
    # without a tf.cond branch.
    apply = tf.random.stateless_uniform([], apply_seed) < probability

    # Beta(alpha, alpha) as g1 / (g1 + g2) of two Gamma(alpha) draws.
    # divide_no_nan: for tiny alpha both draws can underflow to 0.
    gammas = tf.random.stateless_gamma([2], lam_seed, alpha=alpha)
    lam = tf.math.divide_no_nan(gammas[0], gammas[0] + gammas[1])

    cut_fraction = tf.sqrt(1.0 - lam)
    cut_height = tf.cast(tf.floor(tf.cast(height, tf.float32) * cut_fraction), tf.int32)
    cut_width = tf.cast(tf.floor(tf.cast(width, tf.float32) * cut_fraction), tf.int32)
    center_row = tf.random.stateless_uniform([], row_seed, 0, height, dtype=tf.int32)
    center_col = tf.random.stateless_uniform([], col_seed, 0, width, dtype=tf.int32)
    # Box of the full cut size around the centre, then clipped: near an edge
    # less than (1 - lam) of the image is pasted, and lam_adj accounts for it.
    top = tf.clip_by_value(center_row - cut_height // 2, 0, height)
    bottom = tf.clip_by_value(center_row - cut_height // 2 + cut_height, 0, height)
    left = tf.clip_by_value(center_col - cut_width // 2, 0, width)
    right = tf.clip_by_value(center_col - cut_width // 2 + cut_width, 0, width)

    rows = tf.range(height)
    cols = tf.range(width)
    in_rows = (rows >= top) & (rows < bottom)
    in_cols = (cols >= left) & (cols < right)
    # [1, H, W, 1]: the same box for every example and channel, one op per batch.
    mask = (in_rows[:, tf.newaxis] & in_cols[tf.newaxis, :]) & apply
    mask = mask[tf.newaxis, :, :, tf.newaxis]

    partners = tf.minimum(tf.bitwise.bitwise_xor(tf.range(batch), 1), batch - 1)
    mixed_images = tf.where(mask, tf.gather(images, partners), images)

    box_area = tf.cast((bottom - top) * (right - left), tf.float32)
    lam_adj = 1.0 - box_area / tf.cast(height * width, tf.float32)
    lam_adj = tf.where(apply, lam_adj, 1.0)
    one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
    targets = lam_adj * one_hot + (1.0 - lam_adj) * tf.gather(one_hot, partners)

    # Shape inference already keeps what the inputs knew; this also lends the
    # images a batch size only the labels knew, so the distributed step never
    # sees a shape less static than the dataset promised.
    mixed_images.set_shape(static_images_shape)
    mixed_images.set_shape(static_batch.concatenate(mixed_images.shape[1:]))
    targets.set_shape(static_batch.concatenate([num_classes]))
    return mixed_images, targets
