"""The CIFAR ResNeXt-29 of Xie et al. 2017 (Aggregated Residual Transformations), section 5.3.

3x3 stem conv (width), then 3 stages x 3 bottleneck blocks; in stage s the block's
input and output width is 4 n with n = width x 2^(s-1) (256, 512, 1024 at width 64),
and its residual branch is 1x1 conv to C x d, a grouped 3x3 conv with C groups of d
channels (the stage's stride), 1x1 conv to 4 n, each with batch norm, where C is the
cardinality and d = n the bottleneck width (64 at stage 1: "Cx64d"); a 1x1 conv + BN
projection where the shape changes; 29 = 9 blocks x 3 layers + the stem + the
classifier. As the authors' CIFAR code (facebookresearch/ResNeXt, baseWidth 64).

    resnext29_8x64d: 34,426,698 trainable parameters at 10 classes (the paper's Table 7: 34.4 M)
    resnext29_2x64d:  9,130,314 (kuangliu/pytorch-cifar's ResNeXt29_2x64d: 9,128,778, the
                      1,536 fewer of its 1x1 stem; its "8x64d" widens every block and is not
                      the paper's)

`model.width` scales every stage (the tests' width-4 models); `model.se` adds a
squeeze-and-excitation gate to every block. Grouped convolutions run on TensorFlow's
CPU kernels (oneDNN and Eigen) and on GPUs; tests/test_model.py checks them against
per-group convolutions.

    python -m launcher --set model.arch=resnext29_2x64d --dry_run
"""

from __future__ import annotations

from collections.abc import Iterator

import keras

from resnet18.models.layers import (BatchNorm, batch_norm_layers, conv_bn, head, residual, seeds_from,
                                    squeeze_excite, stem)

STAGES = 3
BLOCKS_PER_STAGE = 3
EXPANSION = 4  # a block's output is 4 n; its bottleneck is C x d with d = n


def build_resnext29(
    cardinality: int,
    num_classes: int = 10,
    width: int = 64,
    image_size: int = 32,
    dtype_policy: str = "float32",
    seed: int = 0,
    se: bool = False,
    sync_bn: bool = False,
    fused_batch_norm: bool = True,
) -> keras.Model:
    """The CIFAR ResNeXt-29 with `cardinality` groups of `width` channels at stage 1 (e.g. 8x64d).

    Arguments as resnet.build_resnet18's.
    """
    seeds = seeds_from(seed)
    batch_norm = batch_norm_layers(dtype_policy, sync_bn, fused_batch_norm)
    inputs, x = stem(image_size, width, dtype_policy, seeds, batch_norm)
    for stage in range(1, STAGES + 1):
        for block in range(1, BLOCKS_PER_STAGE + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _aggregated_block(x, width * 2 ** (stage - 1), cardinality, strides, f"stage{stage}_block{block}",
                                  dtype_policy, seeds, se, batch_norm)
    return head(inputs, x, num_classes, dtype_policy, seeds, f"resnext29_{cardinality}x{width}d")


def _aggregated_block(x, bottleneck: int, cardinality: int, strides: int, name: str, dtype_policy: str,
                      seeds: Iterator[int], se: bool, batch_norm: BatchNorm):
    grouped, out = cardinality * bottleneck, EXPANSION * bottleneck
    shortcut = x
    if strides != 1 or x.shape[-1] != out:
        shortcut = conv_bn(x, out, 1, strides, f"{name}_proj", dtype_policy, seeds, batch_norm)
    y = conv_bn(x, grouped, 1, 1, f"{name}_a", dtype_policy, seeds, batch_norm)
    y = keras.layers.ReLU(name=f"{name}_a_relu", dtype=dtype_policy)(y)
    y = conv_bn(y, grouped, 3, strides, f"{name}_b", dtype_policy, seeds, batch_norm, groups=cardinality)
    y = keras.layers.ReLU(name=f"{name}_b_relu", dtype=dtype_policy)(y)
    y = conv_bn(y, out, 1, 1, f"{name}_c", dtype_policy, seeds, batch_norm)
    if se:
        y = squeeze_excite(y, out, name, dtype_policy, seeds)
    return residual(shortcut, y, name, dtype_policy)
