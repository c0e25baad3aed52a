"""A tiny Keras model and batch for in-process step tests (milliseconds per step)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from resnet18.config import Config, TrainConfig
from resnet18.optimization import make_optimizer, make_schedule, make_train_step


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
    step = tf.function(make_train_step(model, optimizer, config, num_classes=10))
    for _ in range(steps):
        step(images, labels)
    return [weight.numpy() for weight in model.trainable_weights]


def batch(size: int = 128):
    images = tf.random.stateless_normal([size, 8, 8, 3], [1, 2])
    labels = tf.random.stateless_uniform([size], [3, 4], 0, 10, dtype=tf.int32)
    return images, labels
