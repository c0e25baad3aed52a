"""A tiny Keras model and batch for in-process step tests (milliseconds per step)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from resnet18.config import Config, SimCLRConfig, TrainConfig
from resnet18.tasks import task_of
from resnet18.tasks.distillation import distilled
from resnet18.tasks.task import Setting
from resnet18.training.optimizers import make_optimizer
from resnet18.training.schedules import make_schedule
from resnet18.training.step import make_train_step


def small_model(seed: int, batch_norm: bool = False) -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, kernel_initializer=keras.initializers.HeNormal(seed))(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, kernel_initializer=keras.initializers.GlorotUniform(seed + 1),
                                 bias_initializer=keras.initializers.RandomNormal(seed=seed + 2))(x)
    return keras.Model(inputs, outputs)


def run_steps(train: TrainConfig, images, labels, steps: int = 2, batch_norm: bool = False) -> list[np.ndarray]:
    config = Config(train=train)
    model = small_model(seed=3, batch_norm=batch_norm)
    optimizer = make_optimizer(config, make_schedule(config, steps_per_epoch=10), model=model)
    optimizer.build(model.trainable_variables)
    step = tf.function(make_train_step(model, optimizer, objective(model, config), config, num_classes=10))
    for _ in range(steps):
        step(images, labels)
    return [weight.numpy() for weight in model.trainable_weights]


def objective(model: keras.Model, config: Config, teacher: keras.Model | None = None,
              strategy: tf.distribute.Strategy | None = None):
    """The objective of `config`'s task for `model` (10 classes); with `teacher`, distillation from it."""
    if teacher is not None:
        return distilled(model, teacher, config, 10)
    setting = Setting(config, strategy or tf.distribute.get_strategy(), 10, "float32")
    return task_of(config).make_objective(setting, model, False)


def batch(size: int = 128):
    images = tf.random.stateless_normal([size, 8, 8, 3], [1, 2])
    labels = tf.random.stateless_uniform([size], [3, 4], 0, 10, dtype=tf.int32)
    return images, labels


def replicated_steps(strategy: tf.distribute.Strategy, config: Config, images, labels, steps: int,
                     make_model, teacher=None) -> list[np.ndarray]:
    """Weights after `steps` train steps under `strategy`, the global batch split evenly over its replicas."""
    with strategy.scope():
        model = make_model()
        optimizer = make_optimizer(config, make_schedule(config, 10), "float32", model)
        optimizer.build(model.trainable_variables)
    step = make_train_step(model, optimizer, objective(model, config, teacher, strategy), config, num_classes=10)
    share = int(images.shape[0]) // strategy.num_replicas_in_sync
    batch = strategy.experimental_distribute_values_from_function(lambda context: (
        images[context.replica_id_in_sync_group * share:][:share],
        labels[context.replica_id_in_sync_group * share:][:share]))

    @tf.function
    def run():
        return strategy.run(step, args=batch)

    for _ in range(steps):
        run()
    return [np.array(strategy.experimental_local_results(weight.value)[0]) for weight in model.weights]


def encoder_and_head() -> keras.Model:
    """A batch-norm-free encoder and projection head (replica equivalence is then exact to round-off)."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, kernel_initializer=keras.initializers.HeNormal(1), name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(8, activation="relu", kernel_initializer=keras.initializers.HeNormal(2))(x)
    return keras.Model(inputs, keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(3))(x))


SIMCLR = Config(simclr=SimCLRConfig(temperature=0.5),
                train=TrainConfig(task="simclr", global_batch_size=16, warmup_epochs=0, lr_schedule="constant",
                                  learning_rate=0.4, weight_decay=0.0))
VIEWS = tf.random.stateless_uniform([16, 2, 8, 8, 3], [1, 2], 0, 1)
LABELS = tf.zeros([16], tf.int32)
