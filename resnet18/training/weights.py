"""Starting a run from another run's weights: `train.init_from: DIR`.

Linear evaluation and fine-tuning of a SimCLR encoder, or fine-tuning a supervised
run on new data, start from the weights of another work directory: its latest good
checkpoint (the weight average when it kept one), restored into the network its
config.yaml describes, then copied layer by layer, by name, into this run's network.
Every encoder layer must match (name and shapes); the heads need not (a SimCLR
projection head has no classifier, a classifier no projection head). Only a fresh
run is initialised: a run that resumes from its own checkpoints continues from them.

    python -m launcher --job jobs/simclr_linear_eval.yaml --set train.init_from=runs/simclr_pretrain
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from resnet18 import config as config_lib
from resnet18.runtime.checkpoint_files import restore_latest_good
from resnet18.config import Config
from resnet18.runtime.errors import ConfigError, SetupError

MUST_MATCH = ("model.arch", "model.width", "model.se", "data.image_size")
HEADS = ("logits", "projection_hidden", "projection_bn", "projection_relu", "projection_out")


def initialize_from(model: keras.Model, config: Config, num_classes: int) -> str:
    """Copies the encoder (and any head of the same shape) of `train.init_from` into `model`; returns the checkpoint.

    Raises:
      SetupError: the directory holds no run or no readable checkpoint.
      ConfigError: its network is another architecture (each differing key named).
    """
    from resnet18.training.state import build_network

    source_dir = config.train.init_from
    path = os.path.join(source_dir, "config.yaml")
    if not tf.io.gfile.exists(path):
        raise SetupError(f"train.init_from {source_dir!r} holds no run (no config.yaml)")
    with tf.io.gfile.GFile(path) as stream:
        source = config_lib.from_yaml_text(stream.read(), path)
    differing = [f"{key}: {_value(source, key)!r} there, {_value(config, key)!r} here" for key in MUST_MATCH
                 if _value(source, key) != _value(config, key)]
    if differing:
        raise ConfigError(f"train.init_from {source_dir!r} holds another network:\n  " + "\n  ".join(differing))
    network = build_network(dataclasses_replace_frozen(source), num_classes, "float32")
    name = "ema_model" if source.train.ema_decay else "model"
    try:
        prefix = restore_latest_good(tf.train.Checkpoint(**{name: network}), os.path.join(source_dir, "checkpoints"))
    except RuntimeError as error:
        raise SetupError(f"train.init_from: {error}") from None
    if prefix is None:
        raise SetupError(f"train.init_from {source_dir!r} holds no checkpoint")
    copied = _copy_by_name(network, model)
    print(f"Initialised {copied} layers from {prefix} (train.init_from)", flush=True)
    return prefix


def dataclasses_replace_frozen(source: Config) -> Config:
    """The source network as it was trained, but never frozen (all its weights are restored)."""
    import dataclasses

    return dataclasses.replace(source, model=dataclasses.replace(source.model, freeze_encoder=False))


def _copy_by_name(source: keras.Model, target: keras.Model) -> int:
    by_name = {layer.name: layer for layer in source.layers}
    copied, missing = 0, []
    for layer in target.layers:
        if not layer.weights:
            continue
        match = by_name.get(layer.name)
        if match is None or [w.shape for w in match.weights] != [w.shape for w in layer.weights]:
            if layer.name not in HEADS:
                missing.append(layer.name)
            continue
        for mine, theirs in zip(layer.weights, match.weights):
            mine.assign(tf.cast(theirs, mine.dtype))
        copied += 1
    if missing:
        raise ConfigError(f"train.init_from: these layers have no match of the same shape there: {missing[:10]}")
    return copied


def _value(config: Config, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value
