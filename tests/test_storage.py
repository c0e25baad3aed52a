"""The work directory's storage failing: a full disk is named as a full disk (not out of memory), exit 2,
nothing saved is lost, and once space is freed the same command resumes. A real, small tmpfs (root)."""
import errno
import os
import signal

import pytest

from launcher.storage import storage_error
from tests.conftest import TINY_JOB, fill_up, small_tmpfs
from tests.processes import Running


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs mounted at tmp_path/disk for the test."""
    with small_tmpfs(tmp_path / "disk", 16) as mount_point:
        yield mount_point


def fill(path) -> None:
    """Writes `path` until the file system has no byte left (the run is stopped meanwhile: nothing frees any)."""
    fill_up(path)
    assert os.statvfs(os.path.dirname(path)).f_bavail == 0


@pytest.mark.slow
def test_a_full_disk_is_named_exits_2_keeps_the_checkpoints_and_the_run_resumes_once_freed(tiny_data_dir,
                                                                                              small_disk):
    workdir = small_disk / "run"
    args = ["--job", TINY_JOB, "--workdir", str(workdir), "--set", f"data.data_dir={tiny_data_dir}",
            "train.epochs=3", "train.checkpoint_every_steps=4", "train.steps_per_loop=2", "train.deterministic=true"]
    run = Running(args)
    run.wait_for(r"Checkpoint at step 4:")
    os.kill(run.process.pid, signal.SIGSTOP)  # nothing more is written while the disk fills up
    filler = small_disk / "filler"
    fill(filler)
    os.kill(run.process.pid, signal.SIGCONT)
    assert run.finish(timeout=300) == 2, run.output[-3000:]
    error = [line for line in run.lines if line.startswith("error:")]
    assert len(error) == 1 and f"no space left on the device of the work directory {workdir}" in error[0], run.output
    assert "0.0 MB free; each checkpoint takes" in error[0] and "train.checkpoint_max_to_keep" in error[0]
    assert "out of memory" not in run.output and "Traceback" not in run.output
    saved = sorted(name for name in os.listdir(workdir / "checkpoints") if name.endswith(".index"))
    assert saved and saved[0] == "ckpt-4.index", saved  # what was saved before the disk filled is still there

    filler.unlink()
    resumed = Running(args)
    assert resumed.finish(timeout=300) == 0, resumed.output[-3000:]
    assert f"Resuming from {workdir}/checkpoints/ckpt-{saved[-1][5:-6]}" in resumed.output
    assert not [name for name in os.listdir(workdir / "checkpoints") if name.endswith("_temp")]


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device"), ["no space left on the device of the work directory"]),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), ["no space left on the device"]),
    (RuntimeError("ckpt-6_temp/part-00000-of-00001.data-00000-of-00001.tempstate; No space left on device "
                  "[Op:SaveV2]"), ["no space left", "[Op:SaveV2]"]),
    (OSError(errno.EROFS, "Read-only file system"), ["read-only file system"]),
    (MemoryError("out of memory"), None),
    (ValueError("a bug"), None),
])
def test_storage_failures_are_told_apart_from_everything_else(tmp_path, error, words):
    mapped = storage_error(error, str(tmp_path))
    if words is None:
        assert mapped is None
    else:
        assert mapped is not None and mapped.exit_code == 2 and all(word in str(mapped) for word in words), mapped
