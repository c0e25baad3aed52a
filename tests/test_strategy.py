"""The strategy factory: every name, auto resolution, and clear errors."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from launcher.cluster import read_tf_config
from resnet18.config import RuntimeConfig
from resnet18.runtime.errors import ConfigError, SetupError
from launcher.strategy import make_strategy, resolve_strategy_name
from resnet18.runtime.topology import topology_of
from tests.conftest import TINY_JOB, run_launcher

CLUSTER = read_tf_config({"TF_CONFIG": json.dumps(
    {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}})})


@pytest.mark.parametrize("runtime, cluster, gpus_found, expected", [
    (RuntimeConfig(), None, 0, "one_device"),
    (RuntimeConfig(), None, 1, "one_device"),
    (RuntimeConfig(), None, 4, "mirrored"),
    (RuntimeConfig(gpus=1), None, 4, "one_device"),
    (RuntimeConfig(gpus=2), None, 4, "mirrored"),
    (RuntimeConfig(cpu_replicas=2), None, 0, "mirrored"),
    (RuntimeConfig(tpu="local"), None, 0, "tpu"),
    (RuntimeConfig(), CLUSTER, 0, "multi_worker"),
    (RuntimeConfig(strategy="mirrored"), None, 0, "mirrored"),
])
def test_auto_resolution(runtime, cluster, gpus_found, expected):
    assert resolve_strategy_name(runtime, cluster, gpus_found) == expected


def test_one_device_on_cpu():
    strategy = make_strategy(RuntimeConfig(strategy="one_device"))
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert strategy.num_replicas_in_sync == 1 and topology_of(strategy).is_chief


def test_auto_without_gpus_is_one_device():
    assert isinstance(make_strategy(RuntimeConfig()), tf.distribute.OneDeviceStrategy)


def test_mirrored_over_two_cpu_replicas(two_replicas):
    strategy = two_replicas
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2
    assert [device.split("/")[-1] for device in strategy.extended.worker_devices] == ["device:CPU:0", "device:CPU:1"]


def test_more_gpus_than_found_names_the_count():
    with pytest.raises(SetupError, match=r"--gpus 4 asked for 4 GPU\(s\) but TensorFlow found 0"):
        make_strategy(RuntimeConfig(gpus=4))


def test_multi_worker_without_tf_config():
    with pytest.raises(SetupError, match="needs TF_CONFIG"):
        make_strategy(RuntimeConfig(strategy="multi_worker"))


def test_single_machine_strategy_with_a_cluster_is_refused():
    with pytest.raises(SetupError, match="TF_CONFIG describes 2 tasks"):
        make_strategy(RuntimeConfig(strategy="mirrored"), CLUSTER)


def test_unreachable_tpu_is_an_error_not_a_hang():
    with pytest.raises(SetupError, match="TPU 'local' is not reachable"):
        make_strategy(RuntimeConfig(strategy="tpu", tpu="local"))


def test_optimizer_sums_replica_gradients(two_replicas):
    """The training loop relies on it: loss / global batch per replica, gradients summed."""
    import keras

    strategy = two_replicas
    with strategy.scope():
        variable = keras.Variable(tf.zeros([2]))
        optimizer = keras.optimizers.SGD(learning_rate=1.0)
        optimizer.build([variable])

    @tf.function
    def step():
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            optimizer.apply_gradients([(tf.cast(replica + 1, tf.float32) * tf.ones([2]), variable)])
        strategy.run(replica_fn)

    step()
    values = [value.numpy().tolist() for value in variable.value.values]
    assert values == [[-3.0, -3.0], [-3.0, -3.0]]


@pytest.mark.parametrize("args, code, words", [
    (["--gpus", "4"], 2, ["found 0"]),
    (["--strategy", "tpu", "--tpu", "local"], 2, ["TPU 'local' is not reachable",
                                                 "tensorflow-tpu at 2.20; this pairing is untested"]),
    (["--strategy", "mirrored", "--cpu_replicas", "2"], 0, ["num_replicas: 2", "MirroredStrategy"]),
    (["--strategy", "one_device"], 0, ["num_replicas: 1", "OneDeviceStrategy"]),
])
def test_dry_run_and_device_errors_through_the_cli(args, code, words):
    result = run_launcher("--job", TINY_JOB, *args, "--dry_run", timeout=120)
    assert result.returncode == code, result.stdout + result.stderr
    output = result.stdout + result.stderr
    for word in words:
        assert word in output
    assert "Traceback" not in output


def test_precision_follows_what_the_hardware_computes_natively():
    from resnet18.runtime.hardware import resolve_precision

    native, avx512_only, avx2_only = {"avx512f", "avx512_bf16"}, {"avx512f"}, {"avx2", "fma"}
    assert resolve_precision("auto", "CPU", flags=native) == "bfloat16"
    assert resolve_precision("auto", "CPU", flags={"amx_bf16"}) == "bfloat16"
    assert resolve_precision("auto", "CPU", flags=avx512_only) == "float32"
    assert resolve_precision("auto", "CPU", flags=avx2_only) == "float32"
    assert resolve_precision("bfloat16", "CPU", flags=native) == "bfloat16"
    for flags in (avx512_only, avx2_only, set()):
        with pytest.raises(ConfigError, match="no native bfloat16"):
            resolve_precision("bfloat16", "CPU", flags=flags)
    assert resolve_precision("float32", "CPU", flags=avx2_only) == "float32"
    assert resolve_precision("auto", "GPU", (8, 0)) == "bfloat16"
    assert resolve_precision("auto", "GPU", (7, 5)) == "float16"
    assert resolve_precision("auto", "GPU", (6, 1)) == "float32"
    assert resolve_precision("bfloat16", "GPU", (7, 0)) == "bfloat16"  # a GPU runs it; the user asked
    assert resolve_precision("auto", "TPU") == "bfloat16"


def test_a_onednn_isa_cap_takes_away_the_flags_above_it():
    # ONEDNN_MAX_CPU_ISA=AVX2 makes TensorFlow's kernels run as on a CPU without AVX-512: bfloat16
    # is then emulated there too, so `auto` must pick float32 and an explicit bfloat16 be refused.
    from resnet18.runtime.hardware import flags_above_isa_cap, has_native_bfloat16

    cpu = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
    assert not has_native_bfloat16(cpu - flags_above_isa_cap("AVX2"))
    assert "avx512f" not in cpu - flags_above_isa_cap("avx2")
    assert cpu - flags_above_isa_cap("AVX512_CORE") == {"avx2", "fma", "avx512f"}
    assert cpu - flags_above_isa_cap("AVX512_CORE_BF16") == {"avx2", "fma", "avx512f", "avx512_bf16"}
    for everything in ("", "ALL", "DEFAULT", "AVX512_CORE_AMX"):
        assert cpu - flags_above_isa_cap(everything) == cpu


@pytest.mark.parametrize("cap, hidden", [
    ("AVX2", {"avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"}),
    ("AVX512_CORE", {"avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"}),
    ("AVX512_CORE_VNNI", {"avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"}),
    ("AVX512_CORE_BF16", {"avx512_fp16", "amx_bf16", "amx_fp16"}),  # float16 hidden: refused, not aborted
    ("AVX512_CORE_FP16", {"amx_bf16", "amx_fp16"}),
    ("AVX10_1_512", {"amx_bf16", "amx_fp16"}),
    ("AVX512_CORE_AMX", {"amx_fp16"}),
    ("AVX10_1_512_AMX_FP16", set()),
    ("AVX10_2_512", set()),
])
def test_each_onednn_isa_level_hides_exactly_the_flags_above_it(cap, hidden):
    from resnet18.runtime.hardware import flags_above_isa_cap

    assert flags_above_isa_cap(cap) == hidden


def test_float16_is_refused_where_the_isa_cap_hides_the_cpus_float16(monkeypatch):
    # TensorFlow routes float16 convolutions to oneDNN by the CPU's own flags; under a cap below
    # AVX512-FP16 oneDNN cannot build them (seen on an Intel Xeon with AMX: AbortedError at the first step).
    from resnet18.runtime import hardware

    intel = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"})
    assert hardware.float16_blocked_by_isa_cap(intel, intel - hardware.flags_above_isa_cap("AVX2"))
    assert not hardware.float16_blocked_by_isa_cap(intel, intel)
    amd = frozenset({"avx2", "fma", "avx512f", "avx512_bf16"})  # no float16 instructions: Eigen's kernels
    assert not hardware.float16_blocked_by_isa_cap(amd, amd - hardware.flags_above_isa_cap("AVX2"))

    monkeypatch.setattr(hardware, "reported_cpu_flags", lambda: intel)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with pytest.raises(ConfigError, match="ONEDNN_MAX_CPU_ISA=AVX2 hides this CPU's avx512_fp16"):
        hardware.resolve_precision("float16", "CPU")
    assert hardware.resolve_precision("auto", "CPU") == "float32"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert hardware.resolve_precision("float16", "CPU") == "float16"


def test_a_multi_host_tpu_has_one_chief_and_one_input_pipeline_per_host():
    from resnet18.data import pipeline as input_pipeline
    from resnet18.runtime.topology import tpu_topology

    pod = tpu_topology(num_replicas=32, num_hosts=4)  # e.g. a v4-32 slice: 4 hosts x 8 cores
    assert pod.is_chief and pod.num_processes == 1 and pod.num_input_pipelines == 4
    context = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=3, num_replicas_in_sync=32)
    assert input_pipeline.pipeline_slice(context, 1024) == (768, 256, 8)  # host 3: the last quarter of the batch
    # Evaluation covers the test split in global batches, whatever the number of hosts.
    assert input_pipeline.eval_steps(10_000, 1024) == 10


def test_local_workers_split_the_visible_gpus_evenly_by_default():
    from launcher.processes import gpu_slices

    assert gpu_slices(2, None, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert gpu_slices(4, None, ["4", "5", "6", "7"]) == ["4", "5", "6", "7"]  # CUDA_VISIBLE_DEVICES respected
    assert gpu_slices(2, None, []) == [None, None]  # no GPU: the workers use the CPU
    assert gpu_slices(2, 0, ["0", "1"]) == ["", ""]
    assert gpu_slices(2, 2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    with pytest.raises(SetupError, match="--workers 3 on a host with 2 GPU"):
        gpu_slices(3, None, ["0", "1"])
    with pytest.raises(SetupError, match="needs 6 GPUs; this host shows 4"):
        gpu_slices(2, 3, ["0", "1", "2", "3"])


def test_dry_run_of_local_workers_says_which_gpus_each_worker_gets():
    result = run_launcher("--job", TINY_JOB, "--workers", "2", "--dry_run", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
                          timeout=60)
    assert result.returncode == 0, result.stderr
    assert "workers: 2 local processes on 127.0.0.1 (worker 0: GPU 0,1; worker 1: GPU 2,3)" in result.stdout
    assert "num_replicas: 4" in result.stdout


def test_dry_run_of_an_elastic_group_says_how_large_each_replicas_batch_may_grow():
    result = run_launcher("--job", TINY_JOB, "--workers", "4", "--min_workers", "2", "--max_restarts", "2", "--dry_run",
                          timeout=60)
    assert result.returncode == 0, result.stderr
    assert "elastic: down to 2 worker(s); each replica's batch then grows up to 32" in result.stdout


@pytest.mark.parametrize("error, code", [
    (tf.errors.AbortedError(None, None, "Collective ops is aborted by: Error reported from /job:worker/task:1"), 138),
    (tf.errors.UnavailableError(None, None, "The following tasks are unhealthy (stopped sending heartbeats)"), 138),
    # oneDNN under an ISA cap that hides the CPU's float16 (an Intel Xeon with AMX): an op, not a peer.
    (tf.errors.AbortedError(None, None, "Operation received an exception:Status: 5, message: could not create "
                                        "a primitive descriptor, in file tensorflow/core/kernels/mkl/mkl_conv_ops.cc"),
     1),
    (tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[512,64,32,32]"), 1),
])
def test_tensorflow_errors_map_to_exit_codes_by_what_they_mean(error, code):
    from launcher.__main__ import mapped_tensorflow_errors
    from resnet18.runtime.errors import LauncherError

    with pytest.raises(LauncherError) as raised, mapped_tensorflow_errors(tf):
        raise error
    assert raised.value.exit_code == code


@pytest.mark.parametrize("text, where", [
    ("OOM when allocating tensor with shape[128,64,32,32] and type float on /job:worker/replica:0/task:1/"
     "device:GPU:0 by allocator GPU_0_bfc", "on GPU:0 (allocator GPU_0_bfc)"),
    ("OOM when allocating tensor with shape[128,64,32,32] and type float on /job:localhost/replica:0/task:0/"
     "device:CPU:0 by allocator mklcpu", "on CPU:0 (allocator mklcpu)"),
    ("failed to allocate memory [Op:Conv2D]", "on a device it does not name"),
])
def test_out_of_memory_names_the_device_and_each_replicas_batch(text, where):
    """What a user lowers is the batch each replica holds: say it, and where memory ran out."""
    from launcher.__main__ import mapped_tensorflow_errors
    from resnet18.runtime.errors import LauncherError

    with pytest.raises(LauncherError) as raised, mapped_tensorflow_errors(tf, batch=(256, 2, 2)):
        raise tf.errors.ResourceExhaustedError(None, None, text)
    message = str(raised.value)
    assert raised.value.exit_code == 1 and message.startswith(f"out of memory {where}"), message
    assert ("each replica holds a batch of 128 (train.global_batch_size 256 over 2 replicas), 64 at a time "
            "(train.grad_accum_steps 2)") in message, message
    assert "lower train.global_batch_size, raise train.grad_accum_steps or use more devices" in message


@pytest.mark.parametrize("version, noted", [("2.18.1", False), ("2.16.1", False), ("2.20.0", False),
                                            ("2.21.0", True), ("3.0.0", True)])
def test_a_tensorflow_newer_than_the_last_tensorflow_tpu_is_noted_not_refused(version, noted):
    from launcher.strategy import tpu_support_note

    note = tpu_support_note(version)
    assert (note is not None) == noted
    assert not noted or (note.startswith(f"note: TensorFlow {version} on a TPU") and "tpu-vm-tf-2.18.0-pjrt" in note)
