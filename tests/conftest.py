"""Shared test set-up: two logical CPU devices, tiny generated CIFAR-10, subprocess helper.

The CPU is split into two logical devices before TensorFlow initialises, so
multi-replica code (MirroredStrategy over 2 replicas) runs on any machine.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from launcher import cpu_environment  # noqa: E402

# The launcher's TensorFlow settings (oneDNN, the host allocator) before TensorFlow is imported: tests in
# this process compute what `python -m launcher` computes, and what the runs they start compute.
cpu_environment.apply()

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from launcher.cluster import environment_without_cluster  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_JOB = os.path.join(REPO, "tests", "jobs", "tiny.yaml")
TINY_TRAIN, TINY_TEST = 640, 250
MICRO_TRAIN, MICRO_TEST = 96, 40

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(scope="session")
def two_replicas():
    """One MirroredStrategy over the two logical CPUs for every in-process test.

    Several MirroredStrategy objects in one process may reuse collective instance keys
    and fail each other's all-reduces, so in-process tests share this one.
    """
    from launcher.strategy import make_strategy
    from resnet18.config import RuntimeConfig

    return make_strategy(RuntimeConfig(cpu_replicas=2))


def prepare_generated(root: str, train: int, test: int) -> str:
    """Prepares generated CIFAR-10 where a run with data.data_dir=ROOT and these sizes looks for it."""
    from resnet18.data import generated_cifar10

    generated_cifar10.prepare(generated_cifar10.generated_data_dir(root, train, test), train, test)
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
    """data.data_dir for the tiny job: generated CIFAR-10 (640 train, 250 test) prepared by the real builder."""
    return prepare_generated(str(tmp_path_factory.mktemp("tfds")), TINY_TRAIN, TINY_TEST)


@pytest.fixture(scope="session")
def micro_data_dir(tmp_path_factory) -> str:
    """data.data_dir for loop tests of a few steps: generated CIFAR-10 (96 train, 40 test)."""
    return prepare_generated(str(tmp_path_factory.mktemp("tfds_micro")), MICRO_TRAIN, MICRO_TEST)


def run_launcher(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python -m launcher ARGS` in a fresh process; returns the completed process."""
    full_env = environment_without_cluster()
    full_env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The CPU smoke job, run once through the CLI: (completed process, work directory)."""
    workdir = tmp_path_factory.mktemp("smoke") / "run"
    result = run_launcher("--job", os.path.join(REPO, "jobs", "cpu_smoke.yaml"), "--workdir", str(workdir), timeout=900)
    return result, workdir


def server_missing(what: str) -> None:
    """A test needing a real server that is not installed: skipped on a laptop, failed where .ci/run ran
    (it installs them and sets LAUNCHER_REQUIRE_SERVERS=1), so CI never passes by skipping."""
    message = f"{what} is not installed (.ci/run installs it from Debian)"
    if os.environ.get("LAUNCHER_REQUIRE_SERVERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def small_tmpfs(mount_point, megabytes: int):
    """A tmpfs of `megabytes` MB mounted at `mount_point` (created) for a test that fills a disk, unmounted
    after it; skips without root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(mount_point, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_up(path) -> None:
    """Writes `path` until its file system has no byte left."""
    # Unbuffered: a buffered writer keeps the bytes of a write that did not fit and fails again on close.
    with open(path, "wb", buffering=0) as stream:
        try:
            while True:
                stream.write(b"\0" * 65536)  # a partial write returns short; the next one raises ENOSPC
        except OSError as error:
            assert error.errno == errno.ENOSPC, error


# One test per core under `-n auto`, tests sharing a costly fixture on one worker: tests/xdist_groups.py.
from tests.xdist_groups import (  # noqa: E402, F401 - pytest finds hooks by their names here
    pytest_cmdline_main, pytest_collection_modifyitems, pytest_configure, pytest_configure_node,
    pytest_xdist_auto_num_workers)
