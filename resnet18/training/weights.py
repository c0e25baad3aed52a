"""Where a run's weights come from, decided once, in this order (big_vision's rule):

1. the run's own newest good checkpoint (a resume; train.init_from is not read again,
   so a run whose source directory has gone still resumes);
2. `train.init_from: DIR` on a fresh start: another run's latest good checkpoint (the
   weight average when it kept one), restored into the network its config.yaml and its
   task describe, then copied layer by layer, by name, into this run's network. Every
   layer must match (name and shapes) but this task's heads, which may stay new (a SimCLR
   projection head has no classifier, a classifier no projection head); the keys config.py
   marks must_match(WARM_START) must be equal;
3. the seed: the weights the network was built with.

Linear evaluation and fine-tuning of a SimCLR encoder, or fine-tuning a finished
supervised run on new data (other classes too: its summary.json names the classes its
classifier has, and this run's classifier starts new), start from the weights of
another work directory this way.

    python -m launcher --job jobs/simclr_linear_eval.yaml --set train.init_from=runs/simclr_pretrain
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from resnet18 import config as config_lib
from resnet18 import identity
from resnet18.config import Config
from resnet18.identity import WARM_START
from resnet18.runtime.checkpoint_files import evaluated_weights, restore_latest_good
from resnet18.runtime.errors import ConfigError, SetupError
from resnet18.runtime.files import read_json
from resnet18.tasks import task_of
from resnet18.training.checkpointing import Checkpointer
from resnet18.training.state import TrainState


def initialize(state: TrainState, checkpointer: Checkpointer, config: Config, num_classes: int,
               say=print) -> int:
    """Gives `state` its weights (own checkpoint, else train.init_from, else the seed's); returns the start step."""
    start_step = checkpointer.restore()
    if checkpointer.last_saved is None and config.train.init_from:
        initialize_from(state.model, config, num_classes, say)
        if state.average is not None:  # the average starts from the weights training starts from
            state.average.copy_weights()
    return start_step


def initialize_from(model: keras.Model, config: Config, num_classes: int, say=print) -> str:
    """Copies the layers of `train.init_from` into `model` (all but the task's heads must match).

    Returns the checkpoint it read.

    Raises:
      SetupError: the directory holds no run or no readable checkpoint.
      ConfigError: its network is another architecture (each differing key named).
    """
    source_dir = config.train.init_from
    path = os.path.join(source_dir, "config.yaml")
    if not tf.io.gfile.exists(path):
        raise SetupError(f"train.init_from {source_dir!r} holds no run (no config.yaml)")
    with tf.io.gfile.GFile(path) as stream:
        source = config_lib.from_yaml_text(stream.read(), path)
    differing = identity.differences(source, config, WARM_START)
    if differing:
        raise ConfigError(f"train.init_from {source_dir!r} holds another network (there -> here):\n  "
                          + "\n  ".join(differing))
    unfrozen = dataclasses.replace(source, model=dataclasses.replace(source.model, freeze_encoder=False))
    # Built with the source's own classes (its summary.json names them), so its classifier restores too:
    # fine-tuning on data with other classes keeps this run's new head (a head, skipped below).
    summary = read_json(os.path.join(source_dir, "summary.json")) or {}
    network = task_of(source).build_network(unfrozen, len(summary.get("class_names") or ()) or num_classes, "float32")
    checkpoints = os.path.join(source_dir, "checkpoints")
    name = evaluated_weights(checkpoints, source.train.ema_decay)
    try:
        prefix = restore_latest_good(tf.train.Checkpoint(**{name: network}), checkpoints)
    except RuntimeError as error:
        raise SetupError(f"train.init_from: {error}") from None
    if prefix is None:
        raise SetupError(f"train.init_from {source_dir!r} holds no checkpoint")
    copied = _copy_by_name(network, model, task_of(config).heads)
    say(f"Initialised {copied} layers from {prefix} (train.init_from)")
    return prefix


def _copy_by_name(source: keras.Model, target: keras.Model, heads: tuple[str, ...]) -> int:
    by_name = {layer.name: layer for layer in source.layers}
    copied, missing = 0, []
    for layer in target.layers:
        if not layer.weights:
            continue
        match = by_name.get(layer.name)
        if match is None or [w.shape for w in match.weights] != [w.shape for w in layer.weights]:
            if layer.name not in heads:
                missing.append(layer.name)
            continue
        for mine, theirs in zip(layer.weights, match.weights):
            mine.assign(tf.cast(theirs, mine.dtype))
        copied += 1
    if missing:
        raise ConfigError(f"train.init_from: these layers have no match of the same shape there: {missing[:10]}")
    return copied
