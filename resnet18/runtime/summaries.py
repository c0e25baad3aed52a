"""TensorBoard scalars of a run: WORKDIR/tensorboard/{train,test}, written by the chief only.

A context manager, so the event files are flushed and closed on every way out of
the loop (done, preempted, NaN, a lost peer).

    tensorboard --logdir runs/
"""

from __future__ import annotations

import os

import tensorflow as tf

SPLITS = ("train", "test")


class Summaries:
    """Scalar writers for the train and test splits; a no-op on workers other than the chief."""

    def __init__(self, workdir: str, is_chief: bool):
        root = os.path.join(workdir, "tensorboard")
        self._writers = {split: tf.summary.create_file_writer(os.path.join(root, split))
                         for split in SPLITS} if is_chief else {}

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        writer = self._writers.get(split)
        if writer is None:
            return
        with writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def __enter__(self) -> "Summaries":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
