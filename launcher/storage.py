"""The work directory's storage failing, named for what it is.

A checkpoint save on a full disk surfaces from TensorFlow as ResourceExhaustedError, the class
out-of-memory uses, and from Python as OSError(ENOSPC); a read-only or vanished directory as other
OSErrors. Each becomes a StorageError naming the path and what the user can do. Exit 2: a restart on
the same storage fails alike, so cluster files do not retry it; an operator frees space (or remounts)
and runs the same command again, which resumes from the last complete checkpoint. Nothing saved is
touched: a save that failed leaves only its `_temp` directory, which the next start removes.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
from typing import Iterator

from resnet18.runtime.errors import EXIT_USAGE, LauncherError

FULL_WORDS = ("No space left on device", "Disk quota exceeded")
READ_ONLY_WORDS = ("Read-only file system",)


class StorageError(LauncherError):
    """The work directory's file system is full, read-only or gone (exit 2: an operator must act)."""

    exit_code = EXIT_USAGE


def _megabytes(size: float) -> str:
    return f"{size / 2**20:,.1f} MB"


def checkpoint_size(workdir: str) -> int | None:
    """Bytes of the newest complete checkpoint in WORKDIR/checkpoints (None if there is none)."""
    index_files = glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index"))
    if not index_files:
        return None
    newest = max(index_files, key=lambda path: int(path.rsplit("-", 1)[1].split(".")[0]))
    return sum(os.path.getsize(path) for path in glob.glob(newest[:-len(".index")] + ".*"))


def full_disk(workdir: str, detail: str) -> StorageError:
    """The error for a full file system under `workdir`: free space, a checkpoint's size, what to do."""
    try:
        free = _megabytes(shutil.disk_usage(workdir).free) + " free"
    except OSError:
        free = "free space unknown"
    size = checkpoint_size(workdir)
    each = f"; each checkpoint takes {_megabytes(size)}" if size else ""
    return StorageError(
        f"no space left on the device of the work directory {workdir} ({free}{each}; {detail}). Free space, "
        "lower train.checkpoint_max_to_keep, or use another --workdir; the checkpoints already saved are intact "
        "and running the same command again resumes from the latest")


def storage_error(error: BaseException, workdir: str) -> StorageError | None:
    """The StorageError `error` stands for, or None when it is not about storage."""
    text = str(error)
    code = getattr(error, "errno", None)
    detail = text.splitlines()[0][:300] if text else type(error).__name__
    if code in (errno.ENOSPC, errno.EDQUOT) or any(word in text for word in FULL_WORDS):
        return full_disk(workdir, detail)
    if code == errno.EROFS or any(word in text for word in READ_ONLY_WORDS):
        return StorageError(f"the work directory {workdir} is on a read-only file system ({detail}); remount it "
                            "writable or use another --workdir")
    if isinstance(error, OSError) and code == errno.ENOENT and "://" not in workdir and not os.path.isdir(workdir):
        return StorageError(f"the work directory {workdir} vanished during the run ({detail}); restore it (or "
                            "its file system) and run the same command again")
    return None


@contextlib.contextmanager
def mapped_storage_errors(workdir: str) -> Iterator[None]:
    """Raises the StorageError for any failure inside that is about the work directory's storage."""
    try:
        yield
    except LauncherError:
        raise
    except Exception as error:  # TensorFlow's OpErrors and Python's OSErrors alike
        storage = storage_error(error, workdir)
        if storage is None:
            raise
        raise storage from None
