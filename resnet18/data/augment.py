"""Training augmentation on whole batches, driven by per-example random numbers.

Each augmentation takes a batch of images and, for every image, a row of uniform
random numbers in [0, 1) that decide what happens to it (shifts, flip, angle,
zoom). The input pipeline draws those numbers for the whole global batch from a
seed of (run seed, step) and gives each replica the rows of its own examples, so
an image is augmented the same way whatever the number of workers and replicas
(pipeline.py). Output: float32 RGB in 0-255 (the model standardises).

    crop_flip               zero-pad 4, random 32x32 crop, horizontal flip (the CIFAR standard)
    rotate_shift_zoom_flip  Keras ImageDataGenerator's set: rotation 15 degrees, shift 0.1,
                            zoom 0.1, flip, nearest fill
    none                    the images as they are

A new augmentation is a function (images, uniforms) -> images, one line in AUGMENTATIONS
saying how many uniforms it takes per image, and its name in config.Augmentation. A task
may bring its own (SimCLR's two views, tasks/simclr.py).

    python -c "from resnet18.data.augment import AUGMENTATIONS; print(sorted(AUGMENTATIONS))"
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import tensorflow as tf

from resnet18.autograph import as_written

CROP_PADDING = 4


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """An augmentation, how many uniform random numbers it needs per image, and how many views it makes."""

    name: str
    num_params: int
    apply: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (images [k, H, W, 3], uniforms [k, num_params]) -> images
    views: int = 1  # > 1: images come out as [k, views, H, W, 3] (several views of each image)

    def image_shape(self, image_size: int) -> list[int]:
        """The shape of what it makes of one image."""
        return [*([self.views] if self.views > 1 else []), image_size, image_size, 3]


@as_written
def crop_flip(images: tf.Tensor, uniforms: tf.Tensor, padding: int = CROP_PADDING) -> tf.Tensor:
    """Zero-pad by `padding`, crop back to size at a random offset, flip half of the images; one op."""
    shifts = tf.floor(uniforms[:, :2] * (2 * padding + 1)) - padding  # integers in [-padding, padding]
    flips = tf.cast(uniforms[:, 2] < 0.5, tf.float32)
    count = tf.shape(images)[0]
    return _affine(images, scale_x=1.0 - 2.0 * flips, scale_y=tf.ones([count]), angle=tf.zeros([count]),
                   shift_x=shifts[:, 0], shift_y=shifts[:, 1], fill_mode="CONSTANT", interpolation="NEAREST")


@as_written
def rotate_shift_zoom_flip(images: tf.Tensor, uniforms: tf.Tensor) -> tf.Tensor:
    """Rotation within 15 degrees, width/height shift 0.1, zoom 0.1, horizontal flip, nearest fill."""
    size = tf.cast(tf.shape(images)[1], tf.float32)
    angle = (uniforms[:, 0] * 30.0 - 15.0) * (math.pi / 180.0)
    shifts = (uniforms[:, 1:3] * 0.2 - 0.1) * size
    zoom = uniforms[:, 3:5] * 0.2 + 0.9
    flips = tf.cast(uniforms[:, 5] < 0.5, tf.float32)
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
    # float32 out: the model takes floats, a round trip through uint8 would cost 10 %.
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation=interpolation, fill_mode=fill_mode)


@as_written
def no_augmentation(images: tf.Tensor, uniforms: tf.Tensor) -> tf.Tensor:  # noqa: ARG001 - same signature
    return tf.cast(images, tf.float32)


# data.augmentation -> the augmentation (and the random numbers it takes per image).
AUGMENTATIONS: dict[str, Augmentation] = {
    "crop_flip": Augmentation("crop_flip", 3, crop_flip),
    "rotate_shift_zoom_flip": Augmentation("rotate_shift_zoom_flip", 6, rotate_shift_zoom_flip),
    "none": Augmentation("none", 0, no_augmentation),
}
