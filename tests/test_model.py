"""The CIFAR ResNet18: pinned parameter count, logits dtype, width option."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from resnet18.model import build_resnet18, decayed_kernels

# The reference CIFAR ResNet18 (e.g. kuangliu/pytorch-cifar) has 11,173,962
# trainable parameters; Keras also counts the 9,600 BN moving means/variances.
TRAINABLE_PARAMS = 11_173_962
TOTAL_PARAMS = 11_183_562


def test_parameter_count_is_pinned():
    model = build_resnet18()
    trainable = sum(int(np.prod(variable.shape)) for variable in model.trainable_variables)
    assert trainable == TRAINABLE_PARAMS
    assert model.count_params() == TOTAL_PARAMS


def test_architecture_shape():
    model = build_resnet18(width=8)
    convs = [layer for layer in model.layers if layer.name.endswith("_conv")]
    assert len(convs) == 1 + 4 * 2 * 2 + 3  # stem, 16 block convs, 3 projection shortcuts
    assert not any("pool" in layer.name and "Max" in type(layer).__name__ for layer in model.layers)
    assert model.get_layer("stage4_block2_out").output.shape[1:] == (4, 4, 64)
    assert len(decayed_kernels(model)) == len(convs) + 1  # + the dense head


def test_logits_are_float32_under_mixed_bfloat16():
    model = build_resnet18(width=4, dtype_policy="mixed_bfloat16")
    logits = model(np.zeros([2, 32, 32, 3], np.float32), training=False)
    assert logits.shape == (2, 10) and logits.dtype == tf.float32
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16"


def test_same_seed_same_weights_other_seed_other_weights():
    first, second, third = (build_resnet18(width=4, seed=seed) for seed in (3, 3, 4))
    kernel = lambda model: model.get_layer("stem_conv").kernel.numpy()  # noqa: E731
    assert np.array_equal(kernel(first), kernel(second))
    assert not np.array_equal(kernel(first), kernel(third))
