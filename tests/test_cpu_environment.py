"""The process settings the launcher gives TensorFlow before importing it (launcher/cpu_environment.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launcher import cpu_environment
from launcher.cluster import environment_without_cluster
from tests.conftest import REPO, TINY_JOB

X86_64 = cpu_environment.X86_64


@pytest.mark.skipif(not X86_64, reason="oneDNN is made the default on x86-64 only")
def test_the_launcher_turns_onednn_on_on_x86_64_unless_the_environment_says_otherwise():
    # TensorFlow turns it on by itself only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX; AVX2-only
    # CPUs ran Eigen, 1.6-1.9x slower (benchmarks/RESULTS.md).
    environ: dict[str, str] = {}
    assert cpu_environment.apply(environ) == {"TF_CPU_ALLOCATOR_USE_BFC": "1", "TF_ENABLE_ONEDNN_OPTS": "1"}
    assert cpu_environment.describe(environ) == environ
    environ = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert cpu_environment.apply(environ) == {"TF_CPU_ALLOCATOR_USE_BFC": "1"}
    assert environ["TF_ENABLE_ONEDNN_OPTS"] == "0"


@pytest.mark.skipif(not X86_64, reason="oneDNN is made the default on x86-64 only")
@pytest.mark.parametrize("setting, kernels", [(None, "oneDNN"), ("0", "Eigen")])
def test_a_run_computes_on_the_kernels_the_launcher_chose(setting, kernels, tmp_path):
    # What TensorFlow made of the setting (it reads it once, at import), as the dry run reports it. Without the
    # launcher's default an AVX2-only CPU said Eigen here (seen on an AMD EPYC Zen 3).
    env = {key: value for key, value in environment_without_cluster().items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", **({"TF_ENABLE_ONEDNN_OPTS": setting} if setting else {})})
    run = subprocess.run([sys.executable, "-m", "launcher", "--job", TINY_JOB, "--strategy", "one_device",
                          "--workdir", str(tmp_path / "run"), "--dry_run"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"(CPU kernels: {kernels})" in run.stdout, run.stdout[-2000:]
