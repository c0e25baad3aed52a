"""A work directory's small files, read and replaced whole: config.yaml, summary.json, teacher.json,
history.jsonl, status.json, events.jsonl.

Each is written under a temporary name of its writer's own and renamed over the old one, so a reader
(another worker, the sidecar evaluator, `python -m launcher.status`, a sweep) sees the old file or the new
one, never half of one, and a crash mid-write leaves the old one. A file several processes add to (the
launcher, the chief and the evaluator all add to events.jsonl) is extended under a lock on local disks that
have locks, so no addition is lost. Local paths go through os (no TensorFlow import: the
--workers launcher stays light); URLs (gs://...) through tf.io.gfile.

    python -c "from resnet18.runtime.files import read_json; print(read_json('runs/cpu_smoke/summary.json'))"
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any


DEFAULT_RUNS_DIR = "runs"  # a run's work directory without --workdir: runs/NAME
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # flock's "this file system has none"
ABANDONED_AFTER_SECONDS = 60.0  # a temporary copy this old, of a writer that is gone, was abandoned


def _gfile():
    import tensorflow as tf  # gfile: the work directory may be a bucket (gs://...)

    return tf.io.gfile


def read_text(path: str) -> str | None:
    """The file's text; None when it does not exist."""
    if "://" in path:
        gfile = _gfile()
        if not gfile.exists(path):
            return None
        with gfile.GFile(path) as stream:
            return stream.read()
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def list_names(directory: str) -> list[str]:
    """The names in `directory`, files and directories (a bucket's with a trailing "/"); empty when it
    does not exist."""
    if "://" in directory:
        gfile = _gfile()
        return gfile.listdir(directory) if gfile.isdir(directory) else []
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def file_in_the_way(directory: str) -> str | None:
    """Why `directory` (local, to be written into or made) cannot be: it, or a directory above it, is a file;
    None when nothing is in the way (remote paths are checked when written)."""
    if "://" in directory:
        return None
    if os.path.exists(directory) and not os.path.isdir(directory):
        return f"{directory!r} is a file, not a directory"
    parent = os.path.dirname(os.path.abspath(directory))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else f"{directory!r} lies under the file {parent!r}"


def modified_seconds(path: str) -> float:
    """When `path` was last written, in seconds since the epoch."""
    if "://" in path:
        return _gfile().stat(path).mtime_nsec / 1e9
    return os.stat(path).st_mtime


def replace_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file renamed into place."""
    temporary = temporary_name(path)
    if "://" in path:
        gfile = _gfile()
        with gfile.GFile(temporary, "w") as stream:
            stream.write(text)
        gfile.rename(temporary, path, overwrite=True)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except OSError:  # a full disk: the half-written copy would only hold space; `path` is as it was
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def temporary_name(path: str) -> str:
    """The calling thread's own temporary name for `path`: work directories may be shared by machines, and
    with a shared name one writer's rename took the other's file."""
    return f"{path}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp"


def remove_abandoned_temporaries(directory: str, older_than: float = ABANDONED_AFTER_SECONDS) -> list[str]:
    """Deletes the temporary copies in `directory` (a local path) that writers on this machine left when they
    were killed mid-write: their process is gone and the copy is older than `older_than` s. Returns their paths.

    A copy is written in milliseconds, so a young one may still be in use by a writer this process cannot
    see under the same host name (a container in another PID namespace: Kubernetes pods on the host network
    share the node's name; or a host whose name ends like this one's). Another machine's: left alone."""
    if "://" in directory or not os.path.isdir(directory):
        return []
    host, removed, now = socket.gethostname(), [], time.time()
    for name in os.listdir(directory):
        parts = name.rsplit(".", 4)  # NAME.<host>.<pid>.<tid>.tmp; a host name may hold dots, NAME too
        if len(parts) < 5 or parts[-1] != "tmp" or not (parts[-3].isdigit() and parts[-2].isdigit()):
            continue
        if not name.endswith(f".{host}.{parts[-3]}.{parts[-2]}.tmp") or is_running(int(parts[-3])):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to delete: it only takes space
            if now - os.stat(path).st_mtime > older_than:
                os.remove(path)
                removed.append(path)
    return removed


def is_running(pid: int) -> bool:
    """Whether `pid` runs on this machine (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def append_text(path: str, text: str) -> None:
    """Adds `text` at the end of `path`: read, extended and replaced whole (object stores cannot append),
    under an exclusive lock on local disks, where several processes add to one file."""
    with _locked(path):
        replace_text(path, (read_text(path) or "") + text)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on PATH.lock while the block runs (local paths; an object store has none)."""
    if "://" in path:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except OSError as error:  # a file system without locks (NFSv3 without lockd, Lustre mounted noflock):
            if error.errno not in NO_LOCKS:  # additions go unlocked there, as on object stores
                raise
        yield


def write_json(path: str, content: dict[str, Any], indent: int = 1) -> None:
    """Writes `content` to `path` through a temporary file renamed into place."""
    replace_text(path, json.dumps(content, indent=indent))


def read_json_lines(path: str, warn: bool = False) -> list[Any]:
    """The JSON value of each line of `path` (empty when it does not exist). A line that is not JSON (a
    torn last line, or a hand edit) is skipped, with a warning on stderr if `warn`: the rest still counts."""
    entries = []
    for number, line in enumerate((read_text(path) or "").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if warn:
                print(f"warning: {path} line {number} is not JSON; ignoring it", file=sys.stderr, flush=True)
    return entries


def read_json(path: str) -> dict[str, Any] | None:
    """The file's JSON object; None when it is missing or unreadable."""
    try:
        text = read_text(path)
        return json.loads(text) if text else None
    except (json.JSONDecodeError, OSError):
        return None
