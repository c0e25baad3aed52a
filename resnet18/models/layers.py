"""The parts every CIFAR network here is built from: stem, conv + batch norm, SE gate, head.

- Input: RGB images, 0-255 (uint8 or float), standardised per channel inside the model
  (so training, evaluation and every export feed raw pixels); then a 3x3 stem conv +
  BN + ReLU, no max-pool (the CIFAR variant of He et al. 2016).
- Head: global average pooling ("pool", what an encoder outputs) and a dense layer
  ("logits") that returns float32 logits (softmax lives in the loss, in float32).
- Batch norm: TensorFlow's fused kernel by default (`FusedBatchNormalization`, Keras'
  variables and rules), Keras' own layer in deterministic mode; `sync_bn` all-reduces
  the batch moments over every replica.
- Squeeze-and-excitation (Hu et al. 2018): channel gates from pooled features, on a
  block's residual branch.
- Grouped convolutions (ResNeXt): TensorFlow's own Conv2D where it has a grouped
  gradient (`GroupedConv2D`), not the XLA function Keras 3 wraps each of them in.

Every conv and dense layer draws its initialiser's seed from one iterator, so a seed
gives the same weights without touching global random state.

    python -c "import resnet18.models as m; help(m.build_model)"
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import keras

# Per-channel statistics of the CIFAR-10 training set (0-255 scale): the model standardises
# its own input, so the input pipeline, the evaluation and every export feed raw RGB.
MEAN_RGB = (125.3, 123.0, 113.9)
STDDEV_RGB = (63.0, 62.1, 66.7)
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

BatchNorm = Callable[..., keras.layers.Layer]  # called with the layer's name


def seeds_from(seed: int) -> Iterator[int]:
    """The initialisers' seeds of one network: a range of its own per run seed."""
    return iter(range(seed * 1000, seed * 1000 + 1000))


def batch_norm_layers(dtype_policy: str, sync_bn: bool, fused: bool) -> BatchNorm:
    """A maker of the model's batch-norm layers: call it with the layer's name."""
    layer = FusedBatchNormalization if fused else keras.layers.BatchNormalization
    return functools.partial(layer, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=sync_bn,
                             dtype=dtype_policy)


def stem(image_size: int, width: int, dtype_policy: str, seeds: Iterator[int], batch_norm: BatchNorm):
    """(inputs, features): the images input, standardised, then 3x3 conv + BN + ReLU."""
    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")  # RGB 0-255, uint8 or float
    # In the graph rather than in tf.data: one less float pass per image on the host (the input
    # pipeline ran 50 % faster), and on a GPU it is a fused, free elementwise op. float32 always.
    # (x - mean) / std as x * (1 / std) - mean / std: Rescaling keeps both as graph constants,
    # which every exporter (TFLite, tf2onnx) folds; Normalization's captured tensors trip tf2onnx.
    x = keras.layers.Rescaling(scale=[1.0 / std for std in STDDEV_RGB],
                               offset=[-mean / std for mean, std in zip(MEAN_RGB, STDDEV_RGB)],
                               name="standardize", dtype="float32")(inputs)
    x = conv_bn(x, width, 3, 1, "stem", dtype_policy, seeds, batch_norm)
    return inputs, keras.layers.ReLU(name="stem_relu", dtype=dtype_policy)(x)


def head(inputs, x, num_classes: int, dtype_policy: str, seeds: Iterator[int], name: str) -> keras.Model:
    """Global average pooling ("pool") and the classifier ("logits", float32): the whole model."""
    x = keras.layers.GlobalAveragePooling2D(name="pool", dtype=dtype_policy)(x)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
        name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


def conv_bn(x, filters: int, kernel_size: int, strides: int, name: str, dtype_policy: str, seeds: Iterator[int],
            batch_norm: BatchNorm, groups: int = 1):
    """A bias-free convolution (grouped when `groups` > 1) and its batch norm, named NAME_conv, NAME_bn."""
    if kernel_size == 1 and strides > 1 and x.shape[-1] < STRIDED_1X1_MIN_CHANNELS:
        x = Subsample(strides, name=f"{name}_subsample", dtype=dtype_policy)(x)
        strides = 1
    x = (GroupedConv2D if groups > 1 else keras.layers.Conv2D)(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        groups=groups,
        use_bias=False,  # BN follows; a bias would be redundant
        kernel_initializer=keras.initializers.HeNormal(seed=next(seeds)),
        name=f"{name}_conv",
        dtype=dtype_policy,
    )(x)
    return batch_norm(name=f"{name}_bn")(x)


def residual(shortcut, y, name: str, dtype_policy: str):
    """shortcut + y, then ReLU: the end of every residual block."""
    y = keras.layers.Add(name=f"{name}_add", dtype=dtype_policy)([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out", dtype=dtype_policy)(y)


def squeeze_excite(y, filters: int, name: str, dtype_policy: str, seeds: Iterator[int]):
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


class GroupedConv2D(keras.layers.Conv2D):
    """Keras' Conv2D with `groups` > 1, computed by TensorFlow's own grouped Conv2D where it can.

    Keras 3's TensorFlow backend runs every grouped convolution as an XLA function
    (keras/src/backend/tensorflow/nn.py, `conv`), whose CPU convolution is thousands of
    small matrix products per step (ResNeXt trained 13 x slower). TensorFlow's Conv2D
    takes groups itself on GPUs (cuDNN) and TPUs (XLA's feature groups), and on CPUs
    through oneDNN only: Eigen, which TensorFlow uses where oneDNN is off (by default on
    AVX2-only CPUs) or does not compute the type natively, has no grouped gradient, so
    Keras' path stays there. The variables and their names are Keras', so checkpoints
    are interchangeable.
    """

    def convolution_op(self, inputs, kernel):
        import tensorflow as tf

        if self.data_format != "channels_last" or not _tensorflow_has_grouped_gradient(inputs):
            return super().convolution_op(inputs, kernel)
        return tf.nn.conv2d(inputs, kernel, strides=self.strides, padding=self.padding.upper(),
                            dilations=self.dilation_rate, data_format="NHWC")


def _tensorflow_has_grouped_gradient(inputs) -> bool:
    """Whether TensorFlow's Conv2D computes a grouped convolution and its gradients for `inputs` where
    they are placed (unplaced: a GPU if there is one, as TensorFlow places them)."""
    import tensorflow as tf

    from resnet18.runtime import hardware

    placed = tf.DeviceSpec.from_string(inputs.device or "").device_type
    kind = placed or ("GPU" if tf.config.list_logical_devices("GPU") else "CPU")
    return kind != "CPU" or hardware.onednn_computes(inputs.dtype.name)


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
