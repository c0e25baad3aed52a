"""The CIFAR ResNets (He et al. 2016; 3x3 stem, no max-pool): ResNet18, and ResNet50 as a distillation teacher.

ResNet18: 4 stages x 2 basic blocks (two 3x3 convs) with width x (1, 2, 4, 8)
channels, stride 2 at the first block of stages 2-4, a 1x1 conv + BN projection
shortcut where the shape changes. ResNet50: bottleneck blocks 3-4-6-3 (1x1, 3x3,
1x1 to 4 x width), as the CIFAR ResNets of kuangliu/pytorch-cifar.

Options, both off by default (then the model, its parameter count and its initial
weights for a seed are exactly the plain ResNet18's): `se` (a squeeze-and-excitation
gate on every block's residual branch) and `sync_bn` (batch-norm moments all-reduced
over every replica).

    python -c "import resnet18.models.resnet as m; m.build_resnet18().summary()"
"""

from __future__ import annotations

from collections.abc import Iterator

import keras

from resnet18.models.layers import (BatchNorm, batch_norm_layers, conv_bn, head, residual, seeds_from,
                                    squeeze_excite, stem)

STAGE_MULTIPLIERS = (1, 2, 4, 8)
BLOCKS_PER_STAGE = 2
RESNET50_BLOCKS = (3, 4, 6, 3)
BOTTLENECK_EXPANSION = 4


def build_resnet18(
    num_classes: int = 10,
    width: int = 64,
    image_size: int = 32,
    dtype_policy: str = "float32",
    seed: int = 0,
    se: bool = False,
    sync_bn: bool = False,
    fused_batch_norm: bool = True,
) -> keras.Model:
    """Builds the CIFAR ResNet18 as a functional Keras model returning float32 logits.

    Args:
      num_classes: size of the dense head.
      width: channels of stage 1 (64 is the paper's; tests use 4-16).
      image_size: height and width of the (square, RGB) input.
      dtype_policy: Keras dtype policy for every layer but the output,
        e.g. "mixed_bfloat16"; the logits are always float32.
      seed: initialisation seed; the same seed gives the same weights, without
        touching global random state.
      se: add a squeeze-and-excitation gate to every basic block.
      sync_bn: synchronise BatchNormalization batch statistics across replicas.
      fused_batch_norm: compute batch norm with TensorFlow's fused kernel (the same
        variables and results as Keras' layer; the train step +14 % with AVX-512, +5 %
        with AVX2, benchmarks/RESULTS.md); False gives Keras' own layer (the tutorial's),
        which deterministic mode uses.
    """
    seeds = seeds_from(seed)
    batch_norm = batch_norm_layers(dtype_policy, sync_bn, fused_batch_norm)
    inputs, x = stem(image_size, width, dtype_policy, seeds, batch_norm)
    for stage, multiplier in enumerate(STAGE_MULTIPLIERS, start=1):
        for block in range(1, BLOCKS_PER_STAGE + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(
                x, width * multiplier, strides, f"stage{stage}_block{block}", dtype_policy, seeds, se, batch_norm)
    return head(inputs, x, num_classes, dtype_policy, seeds, f"resnet18_w{width}")


def build_resnet50(
    num_classes: int = 10,
    width: int = 64,
    image_size: int = 32,
    dtype_policy: str = "float32",
    seed: int = 0,
    se: bool = False,
    sync_bn: bool = False,
    fused_batch_norm: bool = True,
) -> keras.Model:
    """The CIFAR ResNet50 (the distillation teacher): bottleneck blocks 3-4-6-3, 3x3 stem, no max-pool.

    Each bottleneck is 1x1 (width) -> 3x3 (width, the stage's stride) -> 1x1 (4 x width), with a
    1x1 conv + BN projection where the shape changes. Arguments as build_resnet18's.
    """
    seeds = seeds_from(seed)
    batch_norm = batch_norm_layers(dtype_policy, sync_bn, fused_batch_norm)
    inputs, x = stem(image_size, width, dtype_policy, seeds, batch_norm)
    for stage, (multiplier, blocks) in enumerate(zip(STAGE_MULTIPLIERS, RESNET50_BLOCKS), start=1):
        for block in range(1, blocks + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _bottleneck_block(x, width * multiplier, strides, f"stage{stage}_block{block}", dtype_policy,
                                  seeds, se, batch_norm)
    return head(inputs, x, num_classes, dtype_policy, seeds, f"resnet50_w{width}")


def _basic_block(x, filters: int, strides: int, name: str, dtype_policy: str, seeds: Iterator[int], se: bool,
                 batch_norm: BatchNorm):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_bn(x, filters, 1, strides, f"{name}_proj", dtype_policy, seeds, batch_norm)
    y = conv_bn(x, filters, 3, strides, f"{name}_a", dtype_policy, seeds, batch_norm)
    y = keras.layers.ReLU(name=f"{name}_a_relu", dtype=dtype_policy)(y)
    y = conv_bn(y, filters, 3, 1, f"{name}_b", dtype_policy, seeds, batch_norm)
    if se:  # seeds are drawn only when SE is on, so the default model's initial weights are unchanged
        y = squeeze_excite(y, filters, name, dtype_policy, seeds)
    return residual(shortcut, y, name, dtype_policy)


def _bottleneck_block(x, filters: int, strides: int, name: str, dtype_policy: str, seeds: Iterator[int], se: bool,
                      batch_norm: BatchNorm):
    expanded = filters * BOTTLENECK_EXPANSION
    shortcut = x
    if strides != 1 or x.shape[-1] != expanded:
        shortcut = conv_bn(x, expanded, 1, strides, f"{name}_proj", dtype_policy, seeds, batch_norm)
    y = conv_bn(x, filters, 1, 1, f"{name}_a", dtype_policy, seeds, batch_norm)
    y = keras.layers.ReLU(name=f"{name}_a_relu", dtype=dtype_policy)(y)
    y = conv_bn(y, filters, 3, strides, f"{name}_b", dtype_policy, seeds, batch_norm)
    y = keras.layers.ReLU(name=f"{name}_b_relu", dtype=dtype_policy)(y)
    y = conv_bn(y, expanded, 1, 1, f"{name}_c", dtype_policy, seeds, batch_norm)
    if se:
        y = squeeze_excite(y, expanded, name, dtype_policy, seeds)
    return residual(shortcut, y, name, dtype_policy)
