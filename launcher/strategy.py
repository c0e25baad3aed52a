"""The strategy factory: one place that turns the runtime config into a strategy.

    auto          TF_CONFIG with > 1 task -> multi_worker; --tpu -> tpu;
                  > 1 GPU requested or found (or --cpu_replicas > 1) -> mirrored;
                  otherwise one_device (GPU:0, else CPU:0).
    one_device    OneDeviceStrategy on GPU:0 or CPU:0.
    mirrored      MirroredStrategy over the GPUs, or over N logical CPUs (--cpu_replicas N).
    multi_worker  MultiWorkerMirroredStrategy from TF_CONFIG (collectives over gRPC; NCCL on GPUs).
    tpu           TPUStrategy through TPUClusterResolver ("local" on a TPU VM).

The strategy is created before any other TensorFlow op (MultiWorkerMirroredStrategy
requires it) and passed explicitly to everything that needs it.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, TypeVar

import tensorflow as tf

from launcher.cluster import ClusterSpec
from resnet18.config import RuntimeConfig
from resnet18.runtime.errors import SetupError, first_line

TPU_CONNECT_TIMEOUT_SECONDS = 120
# Google's TPU VM runtime table for TensorFlow ends at TF 2.18 (tpu-vm-tf-2.18.0-pjrt; -pod-pjrt on a
# slice), the tensorflow-tpu wheel (jobs/tpu_vm_requirements.txt) at 2.20: a newer TensorFlow on a TPU
# is a pairing nobody tested.
LAST_TPU_RUNTIME = "tpu-vm-tf-2.18.0-pjrt"
LAST_TENSORFLOW_TPU = (2, 20)
T = TypeVar("T")


def resolve_strategy_name(runtime: RuntimeConfig, cluster: ClusterSpec | None, gpus_found: int) -> str:
    """The concrete strategy name `auto` stands for, checked against TF_CONFIG (no TensorFlow needed).

    The dry run and the real run both decide here, so they tell the same story.

    Raises:
      SetupError: a multi-task TF_CONFIG with a one-machine strategy, or multi_worker without TF_CONFIG.
    """
    multi_task = cluster is not None and cluster.num_tasks > 1
    if runtime.strategy not in ("auto", "multi_worker") and multi_task:
        raise SetupError(
            f"TF_CONFIG describes {cluster.num_tasks} tasks but strategy {runtime.strategy!r} runs on one machine; "
            "use --strategy multi_worker (or auto), or unset TF_CONFIG"
        )
    if runtime.strategy == "multi_worker" and cluster is None:
        raise SetupError(
            "strategy multi_worker needs TF_CONFIG describing the cluster; "
            "on one host use `python -m launcher --workers N`"
        )
    if runtime.strategy != "auto":
        return runtime.strategy
    if multi_task:
        return "multi_worker"
    if runtime.tpu:
        return "tpu"
    if runtime.cpu_replicas > 1:
        return "mirrored"
    gpus = gpus_found if runtime.gpus is None else runtime.gpus
    return "mirrored" if gpus > 1 else "one_device"


def make_strategy(runtime: RuntimeConfig, cluster: ClusterSpec | None = None) -> tf.distribute.Strategy:
    """Creates the tf.distribute strategy the runtime config asks for.

    Raises:
      SetupError: the devices, TPU or cluster asked for are not there.
    """
    gpus_found = len(tf.config.list_physical_devices("GPU"))
    name = resolve_strategy_name(runtime, cluster, gpus_found)
    if name == "tpu":
        return _tpu_strategy(runtime.tpu or "")
    gpus = _select_gpus(runtime.gpus)
    if runtime.cpu_replicas:
        _split_cpu(runtime.cpu_replicas)

    if name == "multi_worker":
        if runtime.cpu_replicas > 1:
            raise SetupError("multi_worker uses one CPU device per worker; drop runtime.cpu_replicas")
        return _multi_worker_strategy(gpus)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            devices = [f"/gpu:{index}" for index in range(len(gpus))]
        else:
            devices = [f"/cpu:{index}" for index in range(max(runtime.cpu_replicas, 1))]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise SetupError(f"unknown strategy {name!r}")


def _select_gpus(requested: int | None) -> list:
    """Makes the first `requested` GPUs visible (all when None) and returns them."""
    found = tf.config.list_physical_devices("GPU")
    if requested is None:
        chosen = found
    elif requested > len(found):
        raise SetupError(
            f"--gpus {requested} asked for {requested} GPU(s) but TensorFlow found {len(found)} "
            f"on this machine{_gpu_hint(found)}"
        )
    else:
        chosen = found[:requested]
    if len(chosen) != len(found):
        tf.config.set_visible_devices(chosen, "GPU")
    for gpu in chosen:
        # Allocate on demand so several processes (local workers) can share a GPU host.
        tf.config.experimental.set_memory_growth(gpu, True)
    return chosen


def _gpu_hint(found: list) -> str:
    if found:
        return ""
    build = tf.sysconfig.get_build_info()
    if not build.get("is_cuda_build", False):
        return " (this TensorFlow build has no CUDA support; install tensorflow[and-cuda])"
    return " (check the driver with nvidia-smi and CUDA_VISIBLE_DEVICES)"


def _split_cpu(replicas: int) -> None:
    """Splits CPU:0 into `replicas` logical devices so MirroredStrategy has N replicas."""
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
        )
    except RuntimeError as error:  # devices already initialised in this process
        if len(tf.config.list_logical_devices("CPU")) != replicas:
            raise SetupError(f"cannot split the CPU into {replicas} devices: {error}") from None


def _multi_worker_strategy(gpus: list) -> tf.distribute.Strategy:
    # NCCL between GPUs, ring all-reduce over gRPC between CPUs.
    implementation = (
        tf.distribute.experimental.CommunicationImplementation.NCCL
        if gpus
        else tf.distribute.experimental.CommunicationImplementation.RING
    )
    options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    _take_back_sigterm()
    return strategy


def _take_back_sigterm() -> None:
    """Puts Python's SIGTERM handler back in place of the one TensorFlow installed while connecting.

    The coordination service's preemption notifier (tsl SigtermNotifier) calls std::signal(SIGTERM) as the
    group forms; its handler only logs "SIGTERM caught at" and records a key, so our preemption handling
    would never hear of a notice and the worker would train on to the end. A notice that lands in between
    is read back from that key when training starts (resnet18/runtime/preemption.py).
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not None:
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))


def tpu_support_note(tensorflow_version: str) -> str | None:
    """One line for a TensorFlow newer than the last tensorflow-tpu Google publishes (None otherwise)."""
    if tuple(int(part) for part in tensorflow_version.split(".")[:2]) <= LAST_TENSORFLOW_TPU:
        return None
    return (f"note: TensorFlow {tensorflow_version} on a TPU: Google's TPU runtimes for TensorFlow end at "
            f"{LAST_TPU_RUNTIME} and tensorflow-tpu at {'.'.join(map(str, LAST_TENSORFLOW_TPU))}; this pairing is "
            "untested (docs/clusters.md#cloud-tpus)")


def _tpu_strategy(address: str) -> tf.distribute.Strategy:
    """Connects to the TPU (with a deadline, so an unreachable TPU is an error, not a hang)."""
    note = tpu_support_note(tf.__version__)
    if note:
        print(note, file=sys.stderr, flush=True)

    def connect() -> tf.distribute.Strategy:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        if address not in ("", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)

    try:
        return _call_with_deadline(connect, TPU_CONNECT_TIMEOUT_SECONDS)
    except TimeoutError:
        raise SetupError(
            f"TPU {address!r} did not answer within {TPU_CONNECT_TIMEOUT_SECONDS} s; "
            "check the name or address and that this VM can reach it"
        ) from None
    except (ValueError, RuntimeError, tf.errors.OpError, OSError) as error:
        raise SetupError(f"TPU {address!r} is not reachable: {first_line(error)}") from None


def _call_with_deadline(function: Callable[[], T], seconds: float) -> T:
    """Runs `function` in a daemon thread; TimeoutError if it has not returned in time."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
