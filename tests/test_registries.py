"""Every value every Literal-typed config key allows is built through its registry: none falls back.

A new value added to a Literal in resnet18/config.py without a registry entry (or a builder
here) fails this file. The table BUILDERS must name every Literal-typed key of the config.
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import tensorflow as tf

from resnet18 import config as config_lib
from resnet18.config import Config
from resnet18.runtime.errors import ConfigError, SetupError


def literal_keys(section: type = Config, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Every Literal-typed key of the config (nested sections included) -> its allowed values."""
    found = {}
    hints = typing.get_type_hints(section)
    for field in dataclasses.fields(section):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            found.update(literal_keys(hint, f"{prefix}{field.name}."))
            continue
        literals = [kind for kind in (typing.get_args(hint) or (hint,)) if typing.get_origin(kind) is typing.Literal]
        if typing.get_origin(hint) is typing.Literal:
            literals = [hint]
        for literal in literals:
            found[f"{prefix}{field.name}"] = typing.get_args(literal)
    return found


def with_value(key: str, value, **others) -> Config:
    updates = {key: value, **others}
    return config_lib.merge(Config(), config_lib.nest_overrides(list(updates.items())), "test")


def build_architecture(value):
    from resnet18.models import build_model

    model = build_model(with_value("model.arch", value, **{"model.width": 4}), num_classes=10)
    assert model(tf.zeros([1, 32, 32, 3])).shape == (1, 10)


def build_optimizer(value):
    from resnet18.models import build_model
    from resnet18.training.optimizers import make_optimizer
    from resnet18.training.schedules import make_schedule

    config = with_value("train.optimizer", value, **{"model.width": 4})
    model = build_model(config, 10)
    optimizer = make_optimizer(config, make_schedule(config, 10), model=model)
    optimizer.build(model.trainable_variables)
    assert optimizer.iterations.numpy() == 0


def build_schedule(value):
    from resnet18.training.schedules import make_schedule

    rates = [float(make_schedule(with_value("train.lr_schedule", value), 10)(step)) for step in (0, 50, 299)]
    assert all(np.isfinite(rates)) and rates[1] > 0


def build_augmentation(value):
    from resnet18.data.augment import AUGMENTATIONS
    from resnet18.registry import lookup

    augmentation = lookup(AUGMENTATIONS, with_value("data.augmentation", value).data.augmentation, "data.augmentation")
    images = tf.fill([2, 32, 32, 3], 128.0)
    assert augmentation.apply(images, tf.fill([2, max(augmentation.num_params, 1)], 0.3)).shape == (2, 32, 32, 3)


def build_source(value, tmp_path, micro_data_dir):
    from resnet18.data import sources

    if value == "generated":
        data = with_value("data.source", value, **{"data.data_dir": micro_data_dir, "data.generated.train_examples": 96,
                                                  "data.generated.test_examples": 40}).data
        assert sources.prepare_source(data, str(tmp_path)).num_train == 96
    elif value == "image_folder":
        from PIL import Image

        for split in ("train", "test"):
            (tmp_path / "images" / split / "cat").mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / "cat" / "a.png")
        data = with_value("data.source", value, **{"data.image_folder": str(tmp_path / "images")}).data
        assert sources.prepare_source(data, str(tmp_path)).class_names == ("cat",)
    else:  # TFDS without network: its own entry says CIFAR-10 cannot be had here (no fallback to another source)
        data = with_value("data.source", value, **{"data.data_dir": str(tmp_path / "tfds")}).data
        with pytest.raises(SetupError, match="CIFAR-10 is not prepared"):
            sources.SOURCES[value](data, str(tmp_path), True)


def build_task(value):
    from resnet18.tasks import TASKS

    task = TASKS[value]
    config = with_value("train.task", value, **{"model.width": 4, "distill.teacher_workdir": "teacher",
                                                "train.label_smoothing": 0.0})
    task.check(config)
    network = task.build_network(config, 10, "float32")
    assert network.get_layer("pool") is not None and task.exports in ("classifier", "encoder")


def build_strategy(value):
    from launcher.plan import STRATEGY_CLASSES
    from launcher.strategy import resolve_strategy_name

    runtime = with_value("runtime.strategy", value, **{"runtime.tpu": "local" if value == "tpu" else None}).runtime
    if value == "multi_worker":
        with pytest.raises(SetupError, match="needs TF_CONFIG"):
            resolve_strategy_name(runtime, None, gpus_found=0)
    else:
        assert STRATEGY_CLASSES[resolve_strategy_name(runtime, None, gpus_found=0)]


def build_precision(value):
    from resnet18.models.layers import DTYPE_POLICIES
    from resnet18.runtime.hardware import resolve_precision

    resolved = resolve_precision(value, "TPU")
    assert resolved in DTYPE_POLICIES


def build_optimizer_with_decay(value):
    from resnet18.models import build_model
    from resnet18.training.optimizers import make_optimizer
    from resnet18.training.schedules import make_schedule

    config = with_value("train.weight_decay_mode", value, **{"model.width": 4})
    model = build_model(config, 10)
    make_optimizer(config, make_schedule(config, 10), model=model).build(model.trainable_variables)


def build_best_metric(value):
    from resnet18.training.epoch_rules import HIGHER_IS_BETTER, best_epoch

    assert best_epoch([{value: 0.5}, {value: 0.25}], value) == (0 if HIGHER_IS_BETTER[value] else 1)


def validated(key: str):
    def build(value):
        config_lib.validate(with_value(key, value))
    return build


BUILDERS = {
    "model.arch": build_architecture,
    "train.optimizer": build_optimizer,
    "train.lr_schedule": build_schedule,
    "data.augmentation": build_augmentation,
    "data.source": None,  # needs the test's directories: below
    "train.task": build_task,
    "runtime.strategy": build_strategy,
    "train.precision": build_precision,
    "train.weight_decay_mode": build_optimizer_with_decay,
    "train.lr_scaling": validated("train.lr_scaling"),
    "train.evaluation": validated("train.evaluation"),
    "train.best_checkpoint_metric": build_best_metric,
}


def test_the_table_names_every_literal_key_of_the_config():
    assert sorted(BUILDERS) == sorted(literal_keys())


CASES = [(key, value) for key, values in literal_keys().items() for value in values]


@pytest.mark.parametrize("key, value", CASES, ids=[f"{key}={value}" for key, value in CASES])
def test_every_allowed_value_is_built(key, value, tmp_path, micro_data_dir):
    if key == "data.source":
        build_source(value, tmp_path, micro_data_dir)
    else:
        BUILDERS[key](value)


def test_a_value_without_an_entry_is_an_error_naming_the_key():
    from resnet18.models import ARCHITECTURES
    from resnet18.registry import lookup

    with pytest.raises(ConfigError, match=r"model.arch 'vgg16' has no entry; registered: resnet18, resnet50"):
        lookup(ARCHITECTURES, "vgg16", "model.arch")
