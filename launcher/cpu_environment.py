"""Process settings TensorFlow reads once, at import: chosen here, before it is imported.

- TF_CPU_ALLOCATOR_USE_BFC=1: TensorFlow's best-fit-with-coalescing allocator for host
  memory instead of the system malloc. Training allocates and frees the same large
  activation buffers every step; through glibc's malloc those go back to the kernel
  (mmap/munmap, page faults) every time, and on some CPUs most of a run's CPU time was
  spent in the kernel. The BFC allocator keeps them. Measured in benchmarks/RESULTS.md.
- TF_ENABLE_ONEDNN_OPTS=1 on x86-64: TensorFlow's CPU kernels through oneDNN. TensorFlow
  turns oneDNN on by itself only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX and
  runs its own (Eigen) kernels elsewhere: on AVX2-only CPUs (no native bfloat16) oneDNN
  trained ResNet18 1.6-1.9x faster, with the same gradients to float32 rounding
  (benchmarks/RESULTS.md, "oneDNN against Eigen"). Not set on other architectures, where
  it was never measured.

A value already in the environment wins, so `TF_CPU_ALLOCATOR_USE_BFC=0 python -m
launcher ...` restores TensorFlow's allocator and `TF_ENABLE_ONEDNN_OPTS=0` its Eigen
kernels. `describe()` says what a run used (the benchmark and the run summary record it).

    python -c "from launcher import cpu_environment as c; c.apply(); print(c.describe())"
"""

from __future__ import annotations

import os
import platform
from typing import MutableMapping

X86_64 = platform.machine().lower() in ("x86_64", "amd64")

DEFAULTS = {
    "TF_CPU_ALLOCATOR_USE_BFC": "1",
    **({"TF_ENABLE_ONEDNN_OPTS": "1"} if X86_64 else {}),
}


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Sets each default the environment does not set already; returns what was set."""
    environ = os.environ if environ is None else environ
    chosen = {}
    for key, value in DEFAULTS.items():
        if key not in environ:
            environ[key] = value
            chosen[key] = value
    return chosen


def describe(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The settings in effect for this process (unset: TensorFlow's own default)."""
    environ = os.environ if environ is None else environ
    return {key: environ.get(key, "unset") for key in DEFAULTS}
