"""A cluster task's complete output, also in WORKDIR/logs/<task>-<index>.log.

`--workers N` writes each local worker's log itself; a task started by a cluster
system (Kubeflow, Vertex AI, Slurm) tees its own standard output and error, at the
file-descriptor level so TensorFlow's C++ messages are kept too, into a log file in
the (shared) work directory: every task's log in one place, appended across
restarts, each start headed by its time and TF_CONFIG. Object-store work
directories (gs://) cannot be appended to line by line: there the cluster's own log
collection is the record.

    TF_CONFIG=... python -m launcher --job JOB --workdir /shared/run   # -> /shared/run/logs/worker-1.log
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading

from resnet18.runtime import watchdog

def tee_output(path: str, header: str) -> bool:
    """Copies everything written to fds 1 and 2 into `path` as well; False where it cannot (URLs)."""
    if "://" in path:
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log = open(path, "ab", buffering=0)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    log.write(f"===== {stamp}, {header} =====\n".encode())
    threads = []
    for fd in (1, 2):
        sys.stdout.flush()
        sys.stderr.flush()
        original = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        thread = threading.Thread(target=_copy, args=(read_end, original, log), daemon=True)
        thread.start()
        threads.append((fd, original, thread))

    def restore() -> None:
        """Puts the original descriptors back and waits until the copies have caught up."""
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original, _ in threads:
            os.dup2(original, fd)  # closes the pipe's last write end: the copier sees the end
        for _, _, thread in threads:
            thread.join(timeout=5)
        threads.clear()

    atexit.register(restore)
    watchdog.BEFORE_HARD_EXIT.append(restore)  # its stack dump must reach the log too
    return True


def _copy(read_end: int, original: int, log) -> None:
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        os.write(original, chunk)
        log.write(chunk)
    os.close(read_end)
