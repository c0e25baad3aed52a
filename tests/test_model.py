"""The CIFAR ResNet18: pinned parameter count, logits dtype, width option, SE and synchronized BN."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from resnet18.runtime import hardware
from resnet18.models import ARCHITECTURES, decayed_kernels
from resnet18.models.layers import SE_REDUCTION, GroupedConv2D, Subsample
from resnet18.models.resnet import BLOCKS_PER_STAGE, STAGE_MULTIPLIERS, build_resnet18

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    if not hardware.has_native_bfloat16(hardware.cpu_flags()):
        pytest.skip("bfloat16 is emulated on this CPU (hardware.py): the launcher refuses it there")
    model = build_resnet18(width=4, dtype_policy="mixed_bfloat16")
    logits = model(np.zeros([2, 32, 32, 3], np.float32), training=False)
    assert logits.shape == (2, 10) and logits.dtype == tf.float32
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16"


def test_same_seed_same_weights_other_seed_other_weights():
    first, second, third = (build_resnet18(width=4, seed=seed) for seed in (3, 3, 4))
    kernel = lambda model: model.get_layer("stem_conv").kernel.numpy()  # noqa: E731
    assert np.array_equal(kernel(first), kernel(second))
    assert not np.array_equal(kernel(first), kernel(third))



def test_default_model_draws_one_seed_per_conv_then_the_head():
    # Pins the seed stream of the default model (options off must draw no seeds): conv
    # kernels in build order (stem, then per block: projection, a, b), then the head.
    model = build_resnet18(width=4, seed=3)
    conv_names = ["stem_conv"]
    for stage in range(1, len(STAGE_MULTIPLIERS) + 1):
        for block in range(1, BLOCKS_PER_STAGE + 1):
            prefix = f"stage{stage}_block{block}"
            if stage > 1 and block == 1:
                conv_names.append(f"{prefix}_proj_conv")
            conv_names += [f"{prefix}_a_conv", f"{prefix}_b_conv"]
    assert len(conv_names) == len([layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)])
    for offset, name in enumerate(conv_names):
        kernel = model.get_layer(name).kernel
        expected = keras.initializers.HeNormal(seed=3000 + offset)(kernel.shape)
        assert np.array_equal(kernel.numpy(), expected.numpy()), name
    head = model.get_layer("logits").kernel
    expected_head = keras.initializers.GlorotUniform(seed=3000 + len(conv_names))(head.shape)
    assert np.array_equal(head.numpy(), expected_head.numpy())

def _se_parameters(width: int) -> int:
    """Kernels + biases of the two 1x1 SE convs, summed over the 8 basic blocks."""
    total = 0
    for multiplier in STAGE_MULTIPLIERS:
        filters = width * multiplier
        squeezed = max(1, filters // SE_REDUCTION)
        squeeze = filters * squeezed + squeezed  # filters -> squeezed, ReLU
        excite = squeezed * filters + filters  # squeezed -> filters, sigmoid
        total += BLOCKS_PER_STAGE * (squeeze + excite)
    return total


def test_squeeze_excitation_adds_exactly_its_parameters():
    plain, with_se = build_resnet18(width=16), build_resnet18(width=16, se=True)
    assert _se_parameters(16) == 5_950  # by hand: 2 x (49 + 162 + 580 + 2184)
    assert with_se.count_params() - plain.count_params() == _se_parameters(16)
    assert len(with_se.trainable_weights) - len(plain.trainable_weights) == 8 * 4  # kernel, bias x 2 convs x 8 blocks
    assert with_se.get_layer("stage4_block2_se_squeeze").kernel.shape == (1, 1, 128, 8)
    assert with_se.get_layer("stage1_block1_se_squeeze").kernel.shape == (1, 1, 16, 1)  # max(1, 16 // 16)
    logits = with_se(np.random.default_rng(0).normal(size=[3, 32, 32, 3]).astype(np.float32), training=False)
    assert logits.shape == (3, 10) and logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))


def test_squeeze_excitation_gate_changes_the_output():
    # Different architecture and different draws from the seed stream: same seed, other logits.
    images = np.random.default_rng(1).normal(size=[2, 32, 32, 3]).astype(np.float32)
    plain, with_se = build_resnet18(width=4, seed=3), build_resnet18(width=4, seed=3, se=True)
    assert not np.allclose(plain(images, training=False), with_se(images, training=False))
    assert np.array_equal(  # the stem is built before any SE layer draws a seed
        plain.get_layer("stem_conv").kernel.numpy(), with_se.get_layer("stem_conv").kernel.numpy())


def test_squeeze_excitation_under_mixed_bfloat16():
    if not hardware.has_native_bfloat16(hardware.cpu_flags()):
        pytest.skip("bfloat16 is emulated on this CPU (hardware.py): the launcher refuses it there")
    model = build_resnet18(width=16, dtype_policy="mixed_bfloat16", se=True)
    for name in ("pool", "squeeze", "excite", "scale"):
        assert model.get_layer(f"stage2_block1_se_{name}").compute_dtype == "bfloat16"
    assert model.get_layer("stage2_block1_se_excite").kernel.dtype == "float32"  # mixed: float32 variables
    images = np.random.default_rng(2).normal(size=[2, 32, 32, 3]).astype(np.float32)
    logits = model(images, training=True)
    assert logits.shape == (2, 10) and logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))


def test_sync_bn_changes_no_weights_and_no_inference_output():
    plain, synced = build_resnet18(width=8, seed=3), build_resnet18(width=8, seed=3, sync_bn=True)
    batch_norms = lambda model: [  # noqa: E731
        layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(batch_norms(synced)) == 1 + 16 + 3  # stem, block convs, projections
    assert not any(layer.synchronized for layer in batch_norms(plain))
    assert all(layer.synchronized for layer in batch_norms(synced))
    assert plain.count_params() == synced.count_params()
    assert len(plain.weights) == len(synced.weights)
    for plain_weight, synced_weight in zip(plain.weights, synced.weights):
        assert plain_weight.path == synced_weight.path
        assert np.array_equal(plain_weight.numpy(), synced_weight.numpy()), plain_weight.path
    images = np.random.default_rng(3).normal(size=[4, 32, 32, 3]).astype(np.float32)
    assert np.array_equal(plain(images, training=False).numpy(), synced(images, training=False).numpy())


def test_sync_bn_inference_is_keras_own_batch_norm_inference_to_round_off():
    # The sync-BN model infers with the fused kernel; Keras' synchronized BatchNormalization infers with its own
    # ops. Both compute (x - mean) / sqrt(var + eps) * gamma + beta with the moving statistics: equal to float32
    # round-off through 20 layers (3.6e-7 of outputs up to 2.0 measured on an AMD EPYC; the last bits differ on
    # an Intel Xeon with AMX). Non-trivial statistics, so a kernel that ignored them would fail.
    ours = build_resnet18(width=8, seed=3, sync_bn=True)
    reference = build_resnet18(width=8, seed=3, sync_bn=True, fused_batch_norm=False)
    assert type(reference.get_layer("stem_bn")) is keras.layers.BatchNormalization
    rng = np.random.default_rng(0)
    for mine, theirs in zip(ours.weights, reference.weights):
        name = mine.path.rsplit("/", 1)[1]
        if name in ("gamma", "beta", "moving_mean", "moving_variance"):
            value = (rng.uniform(0.5, 2.0, mine.shape) if name == "moving_variance"
                     else rng.normal(0.0, 0.5, mine.shape)).astype(np.float32)
            mine.assign(value)
            theirs.assign(value)
    images = rng.uniform(0, 255, size=[8, 32, 32, 3]).astype(np.float32)
    expected = reference(images, training=False).numpy()
    np.testing.assert_allclose(ours(images, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)
    untouched = build_resnet18(width=8, seed=3, sync_bn=True)(images, training=False).numpy()
    assert np.abs(untouched - expected).max() > 1e-2  # the statistics matter at this tolerance


# Run in a fresh process: a process gets one set of logical devices and one
# MirroredStrategy. Replica 0 sees all-black images, replica 1 all-white (255), so
# local and global batch moments differ a lot. Prints one JSON line.
_SYNC_BN_SCRIPT = """
import json
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import numpy as np
from resnet18.models.layers import BN_MOMENTUM
from resnet18.models.resnet import build_resnet18

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
per_replica_shape = [2, 8, 8, 3]
images = strategy.experimental_distribute_values_from_function(
    lambda context: tf.fill(per_replica_shape, 255.0 * context.replica_id_in_sync_group))
results = {"replicas": strategy.num_replicas_in_sync}
for sync_bn in (True, False):
    with strategy.scope():
        model = build_resnet18(width=4, image_size=8, sync_bn=sync_bn)

    @tf.function
    def train_forward(images):
        return strategy.run(lambda x: model(x, training=True), args=(images,))

    train_forward(images)
    local = lambda variable: [v.numpy().tolist() for v in strategy.experimental_local_results(variable.value)]
    stem_bn = model.get_layer("stem_bn")
    # What stem_bn normalised: the stem conv's output on each replica's (standardised) batch.
    standardize, stem_conv = model.get_layer("standardize"), model.get_layer("stem_conv")
    conv_outputs = [stem_conv(standardize(tf.fill(per_replica_shape, value))).numpy() for value in (0.0, 255.0)]
    bn_layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    results[str(sync_bn)] = {
        "moving_mean": local(stem_bn.moving_mean),
        "moving_variance": local(stem_bn.moving_variance),
        "local_means": [output.mean(axis=(0, 1, 2)).tolist() for output in conv_outputs],
        "local_variances": [output.var(axis=(0, 1, 2)).tolist() for output in conv_outputs],
        "global_mean": np.concatenate(conv_outputs).mean(axis=(0, 1, 2)).tolist(),
        "global_variance": np.concatenate(conv_outputs).var(axis=(0, 1, 2)).tolist(),
        "all_bn_replicas_equal": all(
            np.array_equal(*local(variable)) for layer in bn_layers
            for variable in (layer.moving_mean, layer.moving_variance)),
    }
results["momentum"] = BN_MOMENTUM
print(json.dumps(results))
"""


def test_sync_bn_all_reduces_batch_moments_across_replicas():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", _SYNC_BN_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results["replicas"] == 2
    momentum = results["momentum"]
    # moving = momentum * initial + (1 - momentum) * batch moment; initial mean 0, variance 1.
    synced, plain = results["True"], results["False"]
    assert np.abs(np.subtract(*synced["local_means"])).max() > 1.0  # the replicas' batches really differ
    for replica in range(2):
        np.testing.assert_allclose(
            synced["moving_mean"][replica], (1 - momentum) * np.array(synced["global_mean"]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            synced["moving_variance"][replica], momentum + (1 - momentum) * np.array(synced["global_variance"]),
            rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            plain["moving_mean"][replica], (1 - momentum) * np.array(plain["local_means"][replica]),
            rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            plain["moving_variance"][replica], momentum + (1 - momentum) * np.array(plain["local_variances"][replica]),
            rtol=1e-4, atol=1e-5)
    assert synced["all_bn_replicas_equal"]
    # Plain BN: Keras 3 moving statistics have aggregation NONE, so each replica's copy of
    # the "mirrored" variable silently keeps its own local statistics.
    assert not np.allclose(*plain["moving_mean"], atol=1e-3)
    assert not plain["all_bn_replicas_equal"]


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_computes_what_keras_batch_norm_computes(dtype):
    from resnet18.models.layers import FusedBatchNormalization

    if dtype == "mixed_bfloat16" and not hardware.has_native_bfloat16(hardware.cpu_flags()):
        pytest.skip("bfloat16 is emulated on this CPU (hardware.py): float32 is the case there")
    x = tf.random.stateless_normal([8, 6, 6, 5], [1, 2]) * 3.0 + 1.5
    keras_bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=dtype)
    fused_bn = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, dtype=dtype)
    for layer in (keras_bn, fused_bn):
        layer.build(x.shape)
        layer.gamma.assign(tf.linspace(0.5, 1.5, 5))
        layer.beta.assign(tf.linspace(-1.0, 1.0, 5))
    tolerance = 1e-5 if dtype == "float32" else 2e-2  # bfloat16 outputs keep 8 bits of mantissa
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        outputs = [tf.cast(layer(x, training=True), tf.float32) for layer in (keras_bn, fused_bn)]
        weights = tf.random.stateless_normal(x.shape, [3, 4])  # so that no gradient cancels to ~0
        losses = [tf.reduce_sum(output * weights) for output in outputs]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=tolerance, atol=tolerance)
    for variable in ("moving_mean", "moving_variance"):  # the same moving-average rule (biased variance)
        np.testing.assert_allclose(getattr(fused_bn, variable).numpy(), getattr(keras_bn, variable).numpy(), rtol=1e-5)
    gradients = [tape.gradient(loss, [x, layer.gamma, layer.beta]) for loss, layer in zip(losses, (keras_bn, fused_bn))]
    for keras_gradient, fused_gradient in zip(*gradients):
        np.testing.assert_allclose(np.asarray(fused_gradient, np.float32), np.asarray(keras_gradient, np.float32),
                                   rtol=10 * tolerance, atol=10 * tolerance)
    np.testing.assert_allclose(tf.cast(fused_bn(x, training=False), tf.float32), tf.cast(keras_bn(x, training=False),
                               tf.float32), rtol=tolerance, atol=tolerance)


def test_fused_and_keras_batch_norm_models_share_weights_and_checkpoints():
    """The fused default and Keras' own layers (the tutorial's) build the same variables from a seed."""
    fused = build_resnet18(width=4, seed=3)
    keras_layers = build_resnet18(width=4, seed=3, fused_batch_norm=False)
    assert any(type(layer).__name__ == "FusedBatchNormalization" for layer in fused.layers)
    assert not any(type(layer).__name__ == "FusedBatchNormalization" for layer in keras_layers.layers)
    assert [v.path for v in fused.weights] == [v.path for v in keras_layers.weights]
    for a, b in zip(fused.weights, keras_layers.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # same initial values: same seeds, same order
    images = tf.random.stateless_uniform([4, 32, 32, 3], [5, 6], maxval=255.0)
    # Inference mode: the same arithmetic in a different kernel, so float32 round-off only.
    np.testing.assert_allclose(fused(images, training=False), keras_layers(images, training=False),
                               rtol=1e-4, atol=1e-5)


def test_a_narrow_models_strided_shortcut_still_computes_a_strided_1x1_convolution():
    """Below STRIDED_1X1_MIN_CHANNELS the shortcut subsamples, then convolves with stride 1: the same function."""
    model = build_resnet18(width=2, image_size=28)  # stage inputs 28, 14, 7 (odd): every shortcut is narrow
    subsampled = [layer.name for layer in model.layers if isinstance(layer, Subsample)]
    assert subsampled == [f"stage{stage}_block1_proj_subsample" for stage in (2, 3, 4)]
    images = tf.random.stateless_uniform([4, 28, 28, 3], [7, 8], maxval=255.0)
    for stage in (2, 3, 4):
        block_input = model.get_layer(f"stage{stage - 1}_block2_out").output
        conv = model.get_layer(f"stage{stage}_block1_proj_conv")
        shortcut = keras.Model(model.input, [block_input, conv.output])
        inputs, outputs = shortcut(images, training=False)
        strided = tf.nn.conv2d(inputs, conv.kernel, strides=2, padding="SAME")
        assert outputs.shape == strided.shape
        # Each output is the same dot product over <= 8 channels: float32 round-off at most.
        np.testing.assert_allclose(outputs, strided, rtol=1e-6, atol=1e-6)
    wide = build_resnet18(width=16)
    assert not any(isinstance(layer, Subsample) for layer in wide.layers)  # real widths keep the plain conv


# Gradients of the width-4 model argv[2] (batch 64), argv[3] times in one process, saved to the .npz in argv[1].
# Inference-mode BN keeps the kernel gradients well conditioned (training-mode BN cancels them to noise).
_GRADIENTS_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
from resnet18.models import ARCHITECTURES

model = ARCHITECTURES[sys.argv[2]](width=4, seed=1)
rng = np.random.default_rng(0)
images = tf.constant(rng.uniform(0, 255, size=(64, 32, 32, 3)), tf.float32)
labels = tf.constant(rng.integers(0, 10, size=64))

@tf.function
def gradients():
    with tf.GradientTape() as tape:
        logits = model(images, training=False)
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    return tape.gradient(loss, model.trainable_variables)

runs = [gradients() for _ in range(int(sys.argv[3]))]
np.savez(sys.argv[1], **{f"{i} {v.path}": g.numpy() for i, run in enumerate(runs)
                         for v, g in zip(model.trainable_variables, run)})
"""


@pytest.mark.slow  # two or three fresh TensorFlow processes
@pytest.mark.parametrize("arch", ["resnet18", "resnext29_8x64d"])
def test_narrow_model_gradients_are_right_on_avx2_kernels_too(tmp_path, arch):
    """oneDNN's AVX2 kernels give the narrow model the gradients TensorFlow's own (Eigen) kernels give.

    Guards the strided-1x1 workaround (resnet18/models/layers.py, oneDNN issue 6035): with a plain strided
    conv, ONEDNN_MAX_CPU_ISA=AVX2 gave stage2_block1_proj_conv a gradient 2.3x its size off, different
    call to call. The cap makes this machine run the kernels of a CPU without AVX-512. ResNeXt's
    grouped convolutions (8 groups of 4 to 16 channels at width 4): oneDNN's, native and capped, against
    Keras' XLA path, which GroupedConv2D keeps where oneDNN is off ("eigen").
    """
    results = {}
    # The reference once; oneDNN four times, as the bug was different call to call. Where the cap leaves
    # every flag of the CPU in use (no AVX-512), that case would repeat the native one.
    cases = {"eigen": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, 1), "native": ({}, 4)}
    if hardware.reported_cpu_flags() & hardware.flags_above_isa_cap("AVX2"):
        cases["avx2"] = ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, 4)
    for name, (env, calls) in cases.items():
        path = tmp_path / f"{name}.npz"
        run = subprocess.run([sys.executable, "-c", _GRADIENTS_SCRIPT, str(path), arch, str(calls)], cwd=REPO,
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = np.load(path)
    reference = results["eigen"]
    for key in results["native"]:
        # float32 sums of up to 64 x 32 x 32 products in another order: ~sqrt(n) x 6e-8 = 1.5e-5 of
        # the layer's largest gradient (3.9e-6 measured); the bug was off by more than the gradient.
        expected = reference["0 " + key.split(" ", 1)[1]]
        scale = np.abs(expected).max()
        for name in cases.keys() - {"eigen"}:
            np.testing.assert_allclose(results[name][key], expected, rtol=0, atol=1e-4 * scale,
                                       err_msg=f"{name}: {key}")


# --- ResNeXt-29 -------------------------------------------------------------------------------

def test_resnext29_has_the_papers_size_and_kuangliu_s_at_2x64d():
    counts = {}
    for arch in ("resnext29_8x64d", "resnext29_2x64d"):
        model = ARCHITECTURES[arch](num_classes=10)
        counts[arch] = sum(int(np.prod(variable.shape)) for variable in model.trainable_variables)
    # Xie et al. 2017, Table 7: ResNeXt-29 8x64d has 34.4 M parameters.
    assert counts["resnext29_8x64d"] == 34_426_698
    # kuangliu/pytorch-cifar's ResNeXt29_2x64d counts 9,128,778 (torch, its models/resnext.py): the same
    # blocks with a 1x1 stem conv (3 x 64 weights) where the paper's, and ours, is 3x3 (3 x 64 x 9).
    assert counts["resnext29_2x64d"] == 9_128_778 + 3 * 64 * 8


def test_resnext_blocks_are_grouped_convolutions_of_cardinality_groups():
    model = ARCHITECTURES["resnext29_8x64d"](width=4, image_size=16)
    grouped = model.get_layer("stage1_block1_b_conv")
    assert grouped.groups == 8 and grouped.kernel.shape == (3, 3, 4, 32)  # 8 groups of d = 4 channels
    assert model.get_layer("stage3_block3_c_conv").filters == 4 * 16  # 4 n, n = width x 2^(3-1)
    images = tf.random.stateless_uniform([2, 16, 16, 3], [1, 2], maxval=255.0)
    block_input = model.get_layer("stage1_block1_a_relu").output
    inputs, outputs = keras.Model(model.input, [block_input, grouped.output])(images, training=False)
    per_group = tf.concat([tf.nn.conv2d(part, kernel, 1, "SAME") for part, kernel in zip(
        tf.split(inputs, 8, axis=-1), tf.split(grouped.kernel, 8, axis=-1))], axis=-1)
    # Each output channel is the same 36-term dot product of its own group: round-off at most.
    np.testing.assert_allclose(outputs, per_group, rtol=1e-5, atol=1e-5)


def _xla_compiled_functions(function: tf.types.experimental.ConcreteFunction) -> list[str]:
    library = function.graph.as_graph_def().library.function
    return [f.signature.name for f in library if f.attr["_XlaMustCompile"].b]


@pytest.mark.skipif(not hardware.onednn_enabled(), reason="TensorFlow runs this CPU on Eigen (oneDNN off: its "
                    "default on AVX2-only CPUs), which has no grouped gradient: Keras' XLA path is kept there")
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_no_architecture_trains_through_an_xla_function(arch):
    """Keras 3 runs each grouped convolution as an XLA function, whose CPU convolution is thousands of
    small matrix products (ResNeXt-29 2x64d trained at 27 images/s against 351-372 with TensorFlow's
    Conv2D, width 16, AMD EPYC Zen 5 with AVX512-BF16). Ours is TensorFlow's Conv2D on the same variables;
    without oneDNN it keeps Keras' path (the AVX2-kernel gradient test's "eigen" case runs that one).
    Every architecture, with its SE gates, is checked: a new one's layers could meet the same wrapper."""
    model = ARCHITECTURES[arch](width=4, image_size=16, se=True)
    images = tf.random.stateless_uniform([2, 16, 16, 3], [1, 2], maxval=255.0)

    @tf.function
    def gradients(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images, training=True))
        return tape.gradient(loss, model.trainable_variables)

    assert _xla_compiled_functions(gradients.get_concrete_function(images)) == []


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("strides", [1, 2])
def test_grouped_conv2d_computes_what_keras_grouped_conv2d_computes(strides, policy):
    if policy == "mixed_bfloat16" and not hardware.has_native_bfloat16(hardware.cpu_flags()):
        pytest.skip("bfloat16 is emulated on this CPU (hardware.py): the launcher refuses it there")
    images = tf.random.stateless_normal([8, 16, 16, 32], [3, 4])
    ours = GroupedConv2D(32, 3, strides=strides, padding="same", groups=8, use_bias=False, dtype=policy)
    keras_own = keras.layers.Conv2D(32, 3, strides=strides, padding="same", groups=8, use_bias=False, dtype=policy)
    ours.build(images.shape)
    keras_own.build(images.shape)
    keras_own.kernel.assign(ours.kernel)
    results = []
    for layer in (ours, keras_own):
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = tf.cast(layer(images), tf.float32)
            loss = tf.reduce_sum(outputs * outputs)
        results.append([outputs, *tape.gradient(loss, [images, layer.kernel])])
    # float32 sums in another order: the kernel's gradient sums 8 x 16 x 16 = 2,048 products, ~sqrt(2048) x
    # 6e-8 = 2.7e-6 of its largest entry (7e-7 measured); outputs and input gradients sum 36 and 36 x 4.
    # bfloat16: each path rounds its results to 8 significant bits, so two can differ by one unit in the
    # last place, 2^-7 of the largest entry (3.3e-3 measured, the kernel's gradient).
    relative = 2.0**-7 if policy == "mixed_bfloat16" else 1e-5
    for mine, theirs, name in zip(*results, ("outputs", "input gradient", "kernel gradient")):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=relative * float(tf.reduce_max(tf.abs(theirs))),
                                   err_msg=name)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_resnext_computes_its_gradients_in_every_policy_on_this_cpu(policy):
    """TensorFlow's CPU Conv2D has a grouped gradient only in oneDNN, which computes float16 only where the
    CPU does natively (AVX512-FP16, AMX-FP16) and runs nothing where it is off; elsewhere Eigen refuses
    ("Gradients for grouped convolutions are not supported on CPU") and Keras' path must be kept."""
    if policy == "mixed_bfloat16" and not hardware.has_native_bfloat16(hardware.cpu_flags()):
        # oneDNN under the AVX2 cap cannot build a bfloat16 convolution at all (seen: "could not create a
        # primitive descriptor"); the launcher never asks, as it refuses bfloat16 there.
        pytest.skip("bfloat16 is emulated on this CPU (hardware.py): the launcher refuses it there")
    model = ARCHITECTURES["resnext29_2x64d"](width=4, image_size=16, dtype_policy=policy)
    images = tf.random.stateless_uniform([2, 16, 16, 3], [1, 2], maxval=255.0)

    @tf.function
    def gradients(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(model(images, training=True), tf.float32))
        return tape.gradient(loss, model.trainable_variables)

    assert all(bool(tf.reduce_all(tf.math.is_finite(tf.cast(g, tf.float32)))) for g in gradients(images))


def test_a_frozen_encoder_gets_no_weight_decay():
    # With model.freeze_encoder only the classifier trains; an L2 term on the frozen kernels has no gradient
    # and only inflated the train_loss the history, TensorBoard and the report show.
    import dataclasses

    from resnet18.config import build_config
    from resnet18.tasks.classification import build_network
    from tests.conftest import TINY_JOB

    config = build_config(TINY_JOB, ["model.width=4"])
    frozen = dataclasses.replace(config, model=dataclasses.replace(config.model, freeze_encoder=True))
    assert [kernel.path for kernel in decayed_kernels(build_network(frozen, 10))] == ["logits/kernel"]
    assert len(decayed_kernels(build_network(config, 10))) == 21  # stem, 16 block convs, 3 shortcuts, the head
