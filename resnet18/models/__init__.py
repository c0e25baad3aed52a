"""The networks, one registry: `model.arch` -> the function that builds it.

Every builder takes the same keyword arguments (num_classes, width, image_size,
dtype_policy, seed, se, sync_bn, fused_batch_norm) and returns a functional Keras
model from uint8/float RGB images to float32 logits, whose global pooling layer is
named "pool" (an encoder ends there) and whose classifier is "logits". A new
architecture is a module here and one line in ARCHITECTURES (and its name in
config.Architecture).

    python -c "import resnet18.models as m; print(sorted(m.ARCHITECTURES))"
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import keras

from resnet18.models import resnet, resnext
from resnet18.models.layers import DTYPE_POLICIES
from resnet18.registry import lookup

if TYPE_CHECKING:
    from resnet18.config import Config

ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "resnet18": resnet.build_resnet18,
    "resnet50": resnet.build_resnet50,
    "resnext29_8x64d": functools.partial(resnext.build_resnext29, 8),
    "resnext29_2x64d": functools.partial(resnext.build_resnext29, 2),
}


def build_model(config: Config, num_classes: int, precision: str = "float32") -> keras.Model:
    """The network a config describes (architecture, width, options, precision, seed)."""
    build = lookup(ARCHITECTURES, config.model.arch, "model.arch")
    # The fused kernel's results are reproducible for one layout but differ bitwise between 2
    # workers and 2 replicas in one process (tests/test_multi_worker.py saw it); Keras' own
    # layer gives the same bits in both, which deterministic mode promises. Same variables.
    return build(
        num_classes=num_classes,
        width=config.model.width,
        image_size=config.data.image_size,
        dtype_policy=DTYPE_POLICIES[precision],
        seed=config.runtime.seed,
        se=config.model.se,
        sync_bn=config.model.sync_bn,
        fused_batch_norm=not config.train.deterministic,
    )


def encoder_of(model: keras.Model) -> keras.Model:
    """The model without its classifier: images -> pooled features (what SimCLR trains, kNN and exports use)."""
    return keras.Model(model.input, model.get_layer("pool").output, name=f"{model.name}_encoder")


def decayed_kernels(model: keras.Model) -> list:
    """Conv and dense kernels that train: the weights that get weight decay (not BN, not biases, and not a
    frozen encoder's, whose L2 term would only add a constant to the loss the run reports)."""
    trainable = {id(variable) for variable in model.trainable_variables}
    return [layer.kernel for layer in model.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and id(layer.kernel) in trainable]
