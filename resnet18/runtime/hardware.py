"""What the hardware computes natively, read once: CPU flags, GPU generation, the precision to train in.

`train.precision: auto` picks the fastest precision the devices compute natively:
bfloat16 on TPUs, A100-class GPUs and newer (compute capability >= 8.0) and CPUs
with AVX512_BF16 or AMX_BF16; float16 with loss scaling on V100/T4 (7.x); float32
elsewhere. An explicit `bfloat16` on a CPU without native support is refused:
TensorFlow would emulate it, and the emulation is far slower than float32
(measured on the smoke model, batch 128, 2 cores: 61 against 735 images/s where
oneDNN has no AVX-512 path for it, 495 against 1,027 with AVX-512 but no BF16).
An explicit `float16` on a CPU is refused where an ONEDNN_MAX_CPU_ISA cap hides the
CPU's AVX512-FP16/AMX-FP16: TensorFlow sends float16 convolutions to oneDNN by the
CPU's own flags, and oneDNN under the cap cannot build one (the first step aborts).

    python -c "from resnet18.runtime import hardware; print(hardware.cpu_summary())"
"""

from __future__ import annotations

import functools
import os
import platform

from resnet18.runtime.errors import ConfigError

NATIVE_BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
NATIVE_FLOAT16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")
PRECISION_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "avx2", "fma")


@functools.lru_cache(maxsize=1)
def reported_cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo reports them (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            line = next((line for line in stream if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags TensorFlow's kernels may use: the reported ones less those above the
    oneDNN ISA cap `ONEDNN_MAX_CPU_ISA` if one is set."""
    return reported_cpu_flags() - flags_above_isa_cap(os.environ.get("ONEDNN_MAX_CPU_ISA", ""))


def float16_blocked_by_isa_cap(reported: frozenset[str] | set[str], usable: frozenset[str] | set[str]) -> bool:
    """Whether TensorFlow would send float16 convolutions to oneDNN (the CPU reports AVX512-FP16 or
    AMX-FP16) while the oneDNN ISA cap leaves neither usable, so oneDNN cannot build them."""
    return bool(set(NATIVE_FLOAT16_CPU_FLAGS) & set(reported)) and not set(NATIVE_FLOAT16_CPU_FLAGS) & set(usable)


# oneDNN's ISA levels (ONEDNN_MAX_CPU_ISA), each including those before it, with the older names of the
# AVX10 ones (oneDNN's dnnl_cpu_isa_t), and the lowest level at which oneDNN uses each CPU flag here.
ISA_LEVELS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
              "AVX512_CORE_BF16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
              "AVX10_2_512_AMX_2")
ISA_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX",
               "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX_FP16"}
FLAG_LEVELS = {"avx512f": "AVX512_CORE", "avx512_bf16": "AVX512_CORE_BF16", "avx512_fp16": "AVX10_1_512",
               "amx_bf16": "AVX10_1_512_AMX", "amx_fp16": "AVX10_1_512_AMX_FP16"}


def flags_above_isa_cap(cap: str) -> frozenset[str]:
    """The CPU flags oneDNN leaves unused under ONEDNN_MAX_CPU_ISA=cap (e.g. AVX2: every AVX-512 one).

    ALL, DEFAULT, no cap, and a name oneDNN does not know (it ignores those) leave everything.
    """
    cap = ISA_ALIASES.get(cap.strip().upper(), cap.strip().upper())
    if cap not in ISA_LEVELS:
        return frozenset()
    level = ISA_LEVELS.index(cap)
    return frozenset(flag for flag, needs in FLAG_LEVELS.items() if ISA_LEVELS.index(needs) > level)


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            return next(line.split(":", 1)[1].strip() for line in stream if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_summary() -> str:
    """Model, logical CPUs and the flags that decide speed and precision, for reports and benchmarks."""
    flags = cpu_flags()
    present = [flag for flag in PRECISION_CPU_FLAGS if flag in flags]
    kind = "AVX512-BF16" if has_native_bfloat16(flags) else "AVX-512, no BF16" if "avx512f" in flags else "no AVX-512"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    kind += f" for oneDNN (ONEDNN_MAX_CPU_ISA={cap})" if cap else ""
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, {kind} ({' '.join(present) or 'flags unknown'})"


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its CPU kernels through oneDNN: TF_ENABLE_ONEDNN_OPTS, else TensorFlow's
    default, which on Linux is on only for CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX
    (tensorflow/core/util/port.cc, DefaultOneDnnPolicy): off on AVX2-only CPUs, Eigen's kernels there."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_kernels() -> str:
    """The CPU kernels TensorFlow runs in this process, as reports name them: "oneDNN" or "Eigen"."""
    return "oneDNN" if onednn_enabled() else "Eigen"


def onednn_computes(dtype: str, flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether TensorFlow's CPU convolutions in `dtype` run in oneDNN here (float32 always when it is on;
    bfloat16 and float16 only where the CPU computes them natively)."""
    flags = cpu_flags() if flags is None else flags
    native = {"float32": True, "bfloat16": has_native_bfloat16(flags),
              "float16": bool(set(NATIVE_FLOAT16_CPU_FLAGS) & set(flags))}
    return native.get(dtype, False) and onednn_enabled()


def has_native_bfloat16(flags: frozenset[str] | set[str]) -> bool:
    """Whether a CPU with these flags computes bfloat16 convolutions natively (oneDNN)."""
    return bool(set(NATIVE_BFLOAT16_CPU_FLAGS) & set(flags))


def resolve_precision(requested: str, device_kind: str, gpu_capability: tuple[int, int] | None = None,
                      flags: frozenset[str] | set[str] | None = None) -> str:
    """The precision to train in on `device_kind` ("TPU", "GPU" or "CPU").

    Raises:
      ConfigError: bfloat16 asked for on a CPU that would only emulate it, or float16 on a CPU
        whose float16 instructions the oneDNN ISA cap hides (exit 2).
    """
    flags = cpu_flags() if flags is None else flags
    if device_kind == "TPU":
        return "bfloat16" if requested == "auto" else requested
    if device_kind == "GPU":
        if requested != "auto":
            return requested
        capability = gpu_capability or (0, 0)
        return "bfloat16" if capability >= (8, 0) else "float16" if capability >= (7, 0) else "float32"
    native = has_native_bfloat16(flags)
    if requested == "auto":
        return "bfloat16" if native else "float32"
    if requested == "bfloat16" and not native:
        raise ConfigError(
            "train.precision bfloat16: this CPU has no native bfloat16 (neither of the CPU flags "
            f"{' nor '.join(NATIVE_BFLOAT16_CPU_FLAGS)}"
            + (f" within ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
               if os.environ.get("ONEDNN_MAX_CPU_ISA") else "")
            + "), so TensorFlow would emulate it, several times slower than float32; use train.precision auto "
            "(float32 here) or float32")
    if requested == "float16" and float16_blocked_by_isa_cap(reported_cpu_flags(), flags):
        raise ConfigError(
            f"train.precision float16: ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')} hides this "
            f"CPU's {' and '.join(sorted(set(NATIVE_FLOAT16_CPU_FLAGS) & reported_cpu_flags()))}, but TensorFlow "
            "still sends float16 convolutions to oneDNN, which cannot build them under the cap; unset "
            "ONEDNN_MAX_CPU_ISA or use train.precision auto or float32")
    return requested


def strategy_precision(requested: str, strategy) -> str:
    """`resolve_precision` for the devices of a tf.distribute strategy."""
    import tensorflow as tf

    devices = " ".join(strategy.extended.worker_devices)
    kind = "TPU" if "TPU" in devices else "GPU" if "GPU" in devices else "CPU"
    capability = None
    if kind == "GPU":
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        capability = details.get("compute_capability", (0, 0))
    return resolve_precision(requested, kind, capability)
