"""The CIFAR ResNets (He et al. 2016; the CIFAR variant: 3x3 stem, no max-pool): ResNet18, and ResNet50
as the distillation teacher (model.arch).

Input: RGB images, 0-255 (uint8 or float), standardised per channel inside the
model (so training, evaluation and every export feed raw pixels). Then a
3x3 stem conv (width) + BN + ReLU, no max-pool; 4 stages x 2 basic blocks with
width x (1, 2, 4, 8) channels, stride 2 at the first block of stages 2-4; a
1x1 conv + BN projection shortcut where the shape changes; global average
pooling; a dense head that returns logits (softmax lives in the loss, in float32).

Options, both off by default (then the model, its parameter count and its initial
weights for a seed are exactly the plain ResNet18's):
  se=True       squeeze-and-excitation (Hu et al. 2018) on every block's residual
                branch: channel gates from pooled features, reduction SE_REDUCTION.
  sync_bn=True  BatchNormalization(synchronized=True): under a tf.distribute
                strategy the batch moments are all-reduced over all replicas, so
                every replica normalises (and updates its moving statistics) with
                the global batch's; without a strategy it is plain BN.

    python -c "import resnet18.models.resnet as m; m.build_resnet18().summary()"
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import keras

if TYPE_CHECKING:
    from resnet18.config import Config

# Per-channel statistics of the CIFAR-10 training set (0-255 scale): the model standardises
# its own input, so the input pipeline, the evaluation and every export feed raw RGB.
MEAN_RGB = (125.3, 123.0, 113.9)
STDDEV_RGB = (63.0, 62.1, 66.7)
STAGE_MULTIPLIERS = (1, 2, 4, 8)
BLOCKS_PER_STAGE = 2
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
SE_REDUCTION = 16  # squeeze width = filters // SE_REDUCTION (the paper's r), at least 1
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


# oneDNN 3.7 (TensorFlow 2.21) gets the weight gradient of a strided 1x1 convolution wrong, and
# writes past its workspace, when the input has fewer channels than its SIMD block (8 with AVX2,
# 16 with AVX-512): https://github.com/uxlfoundation/oneDNN/issues/6035. Narrower than this, a
# strided 1x1 convolution subsamples first and convolves with stride 1: the same function (a 1x1
# "same" convolution pads nothing, so output[i] = input[stride * i]) on kernels without the bug.
STRIDED_1X1_MIN_CHANNELS = 16

RESNET50_BLOCKS = (3, 4, 6, 3)
BOTTLENECK_EXPANSION = 4


def build_model(config: Config, num_classes: int, precision: str = "float32") -> keras.Model:
    """The network a config describes (architecture, width, options, precision, seed)."""
    build = build_resnet50 if config.model.arch == "resnet50" else build_resnet18
    # The fused kernel's results are reproducible for one layout but differ bitwise between 2
    # workers and 2 replicas in one process (tests/test_multi_worker.py saw it); Keras' own
    # layer gives the same bits in both, which deterministic mode promises. Same variables.
    return build(
        num_classes=num_classes,
        width=config.model.width,
        image_size=config.data.image_size,
        dtype_policy=DTYPE_POLICIES[precision],
        seed=config.runtime.seed,
        se=config.model.se,
        sync_bn=config.model.sync_bn,
        fused_batch_norm=not config.train.deterministic,
    )


def encoder_of(model: keras.Model) -> keras.Model:
    """The model without its classifier: images -> pooled features (what SimCLR trains, kNN and exports use)."""
    return keras.Model(model.input, model.get_layer("pool").output, name=f"{model.name}_encoder")


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
    seeds = iter(range(seed * 1000, seed * 1000 + 1000))
    batch_norm = _batch_norm_layers(dtype_policy, sync_bn, fused_batch_norm)
    inputs, x = _stem(image_size, width, dtype_policy, seeds, batch_norm)
    for stage, multiplier in enumerate(STAGE_MULTIPLIERS, start=1):
        for block in range(1, BLOCKS_PER_STAGE + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(
                x, width * multiplier, strides, f"stage{stage}_block{block}", dtype_policy, seeds, se, batch_norm)
    return _head(inputs, x, num_classes, dtype_policy, seeds, f"resnet18_w{width}")


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
    1x1 conv + BN projection where the shape changes (as in the CIFAR ResNets of kuangliu/pytorch-cifar).
    Arguments as build_resnet18's.
    """
    seeds = iter(range(seed * 1000, seed * 1000 + 1000))
    batch_norm = _batch_norm_layers(dtype_policy, sync_bn, fused_batch_norm)
    inputs, x = _stem(image_size, width, dtype_policy, seeds, batch_norm)
    for stage, (multiplier, blocks) in enumerate(zip(STAGE_MULTIPLIERS, RESNET50_BLOCKS), start=1):
        for block in range(1, blocks + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _bottleneck_block(x, width * multiplier, strides, f"stage{stage}_block{block}", dtype_policy,
                                  seeds, se, batch_norm)
    return _head(inputs, x, num_classes, dtype_policy, seeds, f"resnet50_w{width}")


def _batch_norm_layers(dtype_policy: str, sync_bn: bool, fused: bool) -> Callable[..., keras.layers.Layer]:
    """A maker of the model's batch-norm layers: call it with the layer's name."""
    layer = FusedBatchNormalization if fused else keras.layers.BatchNormalization
    return functools.partial(layer, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=sync_bn,
                             dtype=dtype_policy)


def _stem(image_size: int, width: int, dtype_policy: str, seeds: Iterator[int], batch_norm):
    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")  # RGB 0-255, uint8 or float
    # In the graph rather than in tf.data: one less float pass per image on the host (the input
    # pipeline ran 50 % faster), and on a GPU it is a fused, free elementwise op. float32 always.
    # (x - mean) / std as x * (1 / std) - mean / std: Rescaling keeps both as graph constants,
    # which every exporter (TFLite, tf2onnx) folds; Normalization's captured tensors trip tf2onnx.
    x = keras.layers.Rescaling(scale=[1.0 / std for std in STDDEV_RGB],
                               offset=[-mean / std for mean, std in zip(MEAN_RGB, STDDEV_RGB)],
                               name="standardize", dtype="float32")(inputs)
    x = _conv_bn(x, width, 3, 1, "stem", dtype_policy, seeds, batch_norm)
    return inputs, keras.layers.ReLU(name="stem_relu", dtype=dtype_policy)(x)


def _head(inputs, x, num_classes: int, dtype_policy: str, seeds: Iterator[int], name: str) -> keras.Model:
    x = keras.layers.GlobalAveragePooling2D(name="pool", dtype=dtype_policy)(x)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
        name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


def _conv_bn(
    x, filters: int, kernel_size: int, strides: int, name: str, dtype_policy: str, seeds: Iterator[int], batch_norm,
):
    if kernel_size == 1 and strides > 1 and x.shape[-1] < STRIDED_1X1_MIN_CHANNELS:
        x = Subsample(strides, name=f"{name}_subsample", dtype=dtype_policy)(x)
        strides = 1
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,  # BN follows; a bias would be redundant
        kernel_initializer=keras.initializers.HeNormal(seed=next(seeds)),
        name=f"{name}_conv",
        dtype=dtype_policy,
    )(x)
    return batch_norm(name=f"{name}_bn")(x)


def _basic_block(
    x, filters: int, strides: int, name: str, dtype_policy: str, seeds: Iterator[int], se: bool, batch_norm,
):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides, f"{name}_proj", dtype_policy, seeds, batch_norm)
    y = _conv_bn(x, filters, 3, strides, f"{name}_a", dtype_policy, seeds, batch_norm)
    y = keras.layers.ReLU(name=f"{name}_a_relu", dtype=dtype_policy)(y)
    y = _conv_bn(y, filters, 3, 1, f"{name}_b", dtype_policy, seeds, batch_norm)
    if se:  # seeds are drawn only when SE is on, so the default model's initial weights are unchanged
        y = _squeeze_excite(y, filters, name, dtype_policy, seeds)
    y = keras.layers.Add(name=f"{name}_add", dtype=dtype_policy)([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out", dtype=dtype_policy)(y)


def _bottleneck_block(
    x, filters: int, strides: int, name: str, dtype_policy: str, seeds: Iterator[int], se: bool, batch_norm,
):
    expanded = filters * BOTTLENECK_EXPANSION
    shortcut = x
    if strides != 1 or x.shape[-1] != expanded:
        shortcut = _conv_bn(x, expanded, 1, strides, f"{name}_proj", dtype_policy, seeds, batch_norm)
    y = _conv_bn(x, filters, 1, 1, f"{name}_a", dtype_policy, seeds, batch_norm)
    y = keras.layers.ReLU(name=f"{name}_a_relu", dtype=dtype_policy)(y)
    y = _conv_bn(y, filters, 3, strides, f"{name}_b", dtype_policy, seeds, batch_norm)
    y = keras.layers.ReLU(name=f"{name}_b_relu", dtype=dtype_policy)(y)
    y = _conv_bn(y, expanded, 1, 1, f"{name}_c", dtype_policy, seeds, batch_norm)
    if se:
        y = _squeeze_excite(y, expanded, name, dtype_policy, seeds)
    y = keras.layers.Add(name=f"{name}_add", dtype=dtype_policy)([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out", dtype=dtype_policy)(y)


def _squeeze_excite(y, filters: int, name: str, dtype_policy: str, seeds: Iterator[int]):
    """Rescales y's channels by gates in (0, 1) computed from its global average."""
    # keepdims: the [batch, 1, 1, filters] gate broadcasts in the Multiply, and 1x1
    # convs act as the paper's two fully connected layers on it.
    gate = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool", dtype=dtype_policy)(y)
    gate = keras.layers.Conv2D(
        max(1, filters // SE_REDUCTION), 1, activation="relu",
        kernel_initializer=keras.initializers.HeNormal(seed=next(seeds)),  # He: a ReLU follows
        name=f"{name}_se_squeeze", dtype=dtype_policy,
    )(gate)
    # Under a mixed policy this conv computes, and so returns the sigmoid gate, in the
    # compute dtype (bfloat16), the same dtype as y, so the Multiply needs no cast.
    gate = keras.layers.Conv2D(
        filters, 1, activation="sigmoid",
        kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
        name=f"{name}_se_excite", dtype=dtype_policy,
    )(gate)
    return keras.layers.Multiply(name=f"{name}_se_scale", dtype=dtype_policy)([y, gate])


def decayed_kernels(model: keras.Model) -> list:
    """Conv and dense kernels: the weights that get weight decay (not BN, not biases)."""
    return [layer.kernel for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]


class Subsample(keras.layers.Layer):
    """Every `stride`-th row and column of NHWC images: what a strided 1x1 convolution reads."""

    def __init__(self, stride: int, **kwargs):
        super().__init__(**kwargs)
        self.stride = stride

    def call(self, inputs):
        return inputs[:, :: self.stride, :: self.stride, :]

    def compute_output_shape(self, input_shape):
        def subsampled(size):
            return None if size is None else -(-size // self.stride)

        return (input_shape[0], subsampled(input_shape[1]), subsampled(input_shape[2]), input_shape[3])

    def get_config(self) -> dict:
        return {**super().get_config(), "stride": self.stride}


class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization computed by TensorFlow's fused kernel (FusedBatchNormV3).

    Keras 3 computes batch norm as separate ops (moments, then normalise, in float32 even
    under a mixed policy); the fused kernel (oneDNN's on CPUs, cuDNN's on GPUs) does the
    forward and the backward pass each in one op. The variables, their names and the
    moving-average rule are Keras', so checkpoints are interchangeable. Synchronized BN
    (all-reduced moments) keeps Keras' own path in training.
    """

    def call(self, inputs, training=None, mask=None):
        import tensorflow as tf

        # Synchronisation only changes the batch moments of training; inference is the same kernel
        # either way, so a sync-BN model predicts exactly what the plain model does.
        training = bool(training) and self.trainable
        keras_path = self.synchronized and training
        if keras_path or mask is not None or self.renorm or len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs, training=training, mask=mask)
        gamma, beta = tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32)
        if training:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
            # The kernel returns the unbiased (n - 1) variance; Keras' moving average uses the biased one.
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
            variance = variance * (count - 1.0) / count
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return outputs
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, mean=tf.cast(self.moving_mean, tf.float32),
            variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon, data_format="NHWC",
            is_training=False)
        return outputs
