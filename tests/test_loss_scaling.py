"""float16 loss scaling decides alike on every replica and worker: an overflow on one skips the step everywhere.

The overflow is real: one replica's (or one worker's) batch holds pixels of 1e30, which
the model's float16 layers turn into Inf, so only that replica's gradients are not finite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from launcher.cluster import environment_without_cluster
from launcher.processes import free_ports
from resnet18.runtime import hardware
from resnet18.config import Config, TrainConfig
from resnet18.training.optimizers import AgreedLossScaleOptimizer, make_optimizer
from resnet18.training.schedules import make_schedule
from resnet18.tasks.classification import cross_entropy
from resnet18.training.step import make_train_step
from tests.conftest import REPO

BATCH = 8  # global

# Depends on the CPU only under an ONEDNN_MAX_CPU_ISA cap: where the CPU has AVX512-FP16 but the cap
# hides it, oneDNN cannot build the float16 convolution TensorFlow sends it (the launcher refuses
# float16 there, hardware.py); without the cap, or on a CPU without float16 instructions, it runs.
pytestmark = pytest.mark.skipif(
    hardware.float16_blocked_by_isa_cap(hardware.reported_cpu_flags(), hardware.cpu_flags()),
    reason="float16 convolutions cannot be built under this ONEDNN_MAX_CPU_ISA cap on this CPU (hardware.py)")


def float16_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, dtype="mixed_float16", kernel_initializer=keras.initializers.HeNormal(1))(inputs)
    x = keras.layers.GlobalAveragePooling2D(dtype="mixed_float16")(x)
    outputs = keras.layers.Dense(10, dtype="float32", kernel_initializer=keras.initializers.GlorotUniform(2))(x)
    return keras.Model(inputs, outputs)


def test_one_overflowing_replica_skips_the_step_on_both(two_replicas):
    strategy = two_replicas
    config = Config(train=TrainConfig(global_batch_size=BATCH, warmup_epochs=0, lr_schedule="constant"))
    with strategy.scope():
        model = float16_model()
        optimizer = make_optimizer(config, make_schedule(config, 10), "float16", model)
        optimizer.build(model.trainable_variables)
    assert isinstance(optimizer, AgreedLossScaleOptimizer)
    step = make_train_step(model, optimizer, cross_entropy(model, config, 10), config, num_classes=10)
    labels = strategy.experimental_distribute_values_from_function(
        lambda context: tf.zeros([BATCH // 2], tf.int32))

    @tf.function
    def run(second_replica_value):
        images = strategy.experimental_distribute_values_from_function(lambda context: tf.fill(
            [BATCH // 2, 8, 8, 3], tf.where(context.replica_id_in_sync_group == 0, 0.01, second_replica_value)))
        strategy.run(step, args=(images, labels))

    def kernels():
        return [np.array(value) for value in strategy.experimental_local_results(model.weights[0].value)]

    def scales():
        return [float(value) for value in strategy.experimental_local_results(optimizer.dynamic_scale.value)]

    start, scale = kernels(), scales()
    run(tf.constant(0.02))  # an ordinary step: applied
    applied = kernels()
    assert not np.array_equal(applied[0], start[0]) and scales() == scale
    run(tf.constant(1e30))  # the second replica overflows (Inf in its float16 layers)
    for replica, value in enumerate(kernels()):
        assert np.all(np.isfinite(value)), f"replica {replica} applied the overflow"
        np.testing.assert_array_equal(value, applied[replica])  # skipped on both: not moved at all
    assert scales() == [scale[0] / 2] * 2  # halved on both replicas alike


WORKER_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    sys.path.insert(0, {repo!r})
    from launcher.cluster import read_tf_config
    from launcher.strategy import make_strategy
    from resnet18.config import Config, RuntimeConfig, TrainConfig
    from resnet18.training.optimizers import make_optimizer
    from resnet18.training.schedules import make_schedule
    from resnet18.tasks.classification import cross_entropy
    from resnet18.training.step import make_train_step
    from tests.test_loss_scaling import float16_model
    strategy = make_strategy(RuntimeConfig(strategy="multi_worker"), read_tf_config())
    worker = strategy.cluster_resolver.task_id
    config = Config(train=TrainConfig(global_batch_size=4, warmup_epochs=0, lr_schedule="constant"))
    with strategy.scope():
        model = float16_model()
        optimizer = make_optimizer(config, make_schedule(config, 10), "float16", model)
        optimizer.build(model.trainable_variables)
    step = make_train_step(model, optimizer, cross_entropy(model, config, 10), config, num_classes=10)

    @tf.function
    def run(images, labels):
        strategy.run(step, args=(images, labels))

    for index in range(3):  # worker 1's second batch overflows; the others are ordinary
        value = 1e30 if (worker == 1 and index == 1) else 0.01 * (index + 1)
        run(tf.fill([2, 8, 8, 3], value), tf.zeros([2], tf.int32))
    weights = [np.asarray(weight.numpy()) for weight in model.weights]
    print(json.dumps({{"finite": bool(all(np.isfinite(w).all() for w in weights)),
                      "weights": float(sum(float(np.sum(w, dtype=np.float64)) for w in weights)),
                      "scale": float(optimizer.dynamic_scale.numpy())}}))
""")


@pytest.mark.slow
def test_one_overflowing_worker_neither_hangs_nor_diverges_the_two_workers(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT.format(repo=REPO))
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = [subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment_without_cluster(TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))) for index in range(2)]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=180)  # a hang (the old per-replica decision) fails here
            assert process.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            process.kill()
    assert all(result["finite"] for result in results)
    assert results[0] == results[1]  # same weights, same loss scale
    assert results[0]["scale"] == 2.0 ** 15 / 2  # one step skipped and halved, on both
