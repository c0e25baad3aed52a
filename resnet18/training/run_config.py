"""The config of a work directory's checkpoints: WORKDIR/config.yaml, kept true across resumes.

A run that resumes from checkpoints may change what does not change their meaning
(epochs, the learning rate, logging, the checkpoint interval, devices, the number of
workers, the precision): those changes are recorded in WORKDIR/config_changes.jsonl. A
change to a key that alters the model, the data order or what a step means (marked
must_match(RESUME) in config.py, with the keys of the sections the task reads) is refused
with exit 2, naming each key, and config.yaml keeps describing the checkpoints; it is
rewritten only once a restore has succeeded. config.yaml names the precision the run
resolved (`auto` -> bfloat16 or float32), so a resume on other hardware records it.

    python -m launcher --job JOB --workdir runs/x --set train.epochs=60   # resumes, records the change
"""

from __future__ import annotations

import json
import os
import time

import tensorflow as tf

from resnet18 import config as config_lib
from resnet18 import identity
from resnet18.runtime.checkpoint_files import checkpoint_candidates
from resnet18.config import Config
from resnet18.runtime.errors import ConfigError
from resnet18.runtime.files import append_text, replace_text


def check_resume_config(config: Config, workdir: str, sections: tuple[str, ...]) -> None:
    """Refuses to resume checkpoints with a config that would change what they mean.

    WORKDIR/config.yaml describes the checkpoints beside it. A run resuming from them may not change a
    key that alters the model, the data order or the meaning of a step (must_match(RESUME), with the
    task's `sections`); other changes are allowed and recorded once the restore succeeded (`save_config`).

    Raises:
      ConfigError: such a key differs from the config that wrote the checkpoints (exit 2), each named.
    """
    path = os.path.join(workdir, "config.yaml")  # tf.io.gfile: the work directory may be a bucket (gs://...)
    if not checkpoint_candidates(os.path.join(workdir, "checkpoints")) or not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as stream:
        saved = config_lib.from_yaml_text(stream.read(), path)
    refused, _ = identity.resume_changes(saved, config, sections)
    if refused:
        raise ConfigError(
            f"{workdir} holds checkpoints written with another config ({path}); these keys would change the "
            "model, the data order or what a step means:\n  " + "\n  ".join(refused)
            + f"\nresume with that config (--job {path}) or use another --workdir")


def save_config(config: Config, workdir: str, restored: str | None, sections: tuple[str, ...]) -> None:
    """Makes WORKDIR/config.yaml this run's config (after a successful restore); records what changed."""
    path = os.path.join(workdir, "config.yaml")
    if restored and tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as stream:
            _, allowed = identity.resume_changes(config_lib.from_yaml_text(stream.read(), path), config, sections)
        if allowed:
            print("Config changed since the checkpoints were written (recorded in config_changes.jsonl): "
                  + "; ".join(allowed), flush=True)
            append_text(os.path.join(workdir, "config_changes.jsonl"), json.dumps({
                "time": time.time(), "checkpoint": os.path.basename(restored), "changes": allowed}) + "\n")
    replace_text(path, config_lib.dump(config))  # other workers may be reading it (check_resume_config)

