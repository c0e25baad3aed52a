"""SimCLR (Chen et al. 2020): two augmented views per image, NT-Xent over the global batch, a kNN monitor.

- Views: random resized crop (area in [crop_scale_min, 1], aspect ratio 3/4-4/3),
  horizontal flip, colour jitter (brightness, contrast, saturation, hue) with
  probability 0.8, grayscale with probability 0.2; each image's two views are
  drawn from its own random numbers (data/augment.py's scheme), on whole batches. The
  reference applies the four jitters in a random order per image; here they come in
  one order, which keeps the op vectorised.
- Model: the encoder (the classifier without its head) and a projection head, a
  2-layer MLP to `projection_dim` (Dense without bias, batch norm, ReLU, Dense), as
  SimCLR v1 with the reference TF2 code's batch norm.
- Loss: NT-Xent. **Negatives come from the global batch**: every replica gathers the
  projections of all replicas and workers and computes the loss of its own anchors
  against all 2B - 1 others, as the reference does on TPU pods (tpu_cross_replica_concat).
  The gather is differentiable (its gradient is the sum over replicas, sliced back),
  so the gradients are those of one device holding the whole global batch; per-replica
  negatives would be a different, weaker objective that shrinks as replicas are added.
- Monitor: a weighted kNN classifier (k = 200, cosine, votes exp(similarity / 0.1),
  as in InstDisc and MoCo's monitor) on the encoder's features of the test split
  against the training split's, every epoch (inline, or in the sidecar evaluator): the
  accuracy a run reports. It exports the encoder.
- Refused (`check`): what needs labels (CutMix, flip TTA), a frozen encoder, gradient
  accumulation (a micro-batch
  would gather only its own projections: its negatives would not be the global
  batch's), and XLA on GPUs and CPUs (the gather would sit inside the compiled pass).
  What needs a test loss (plateau, early stopping, best-by-test-loss) is refused for every
  task without one (tasks/__init__.py).

TensorFlow is imported inside the functions: config validation reads `TASK.check`
before TensorFlow starts (tasks/task.py).

    python -m launcher --job jobs/simclr_pretrain.yaml
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from resnet18.config import Config, SimCLRConfig
from resnet18.runtime.errors import ConfigError
from resnet18.tasks.task import Evaluate, Objective, Setting, Task

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from resnet18.data.augment import Augmentation
    from resnet18.data.sources import Source

LARGE = 1e9  # masks an anchor's similarity with itself
# Uniform random numbers per view: crop area, aspect ratio, top, left; flip; jitter gate; brightness,
# contrast, saturation, hue factors; grayscale gate.
VIEW_PARAMS = 11
PARAMS_PER_IMAGE = 2 * VIEW_PARAMS
HEADS = ("projection_hidden", "projection_bn", "projection_relu", "projection_out")


def check(config: Config) -> None:
    """Refuses what SimCLR cannot do: options that need labels, and splits of its global batch."""
    train = config.train
    refused = [(key, why) for key, why, used in (
        ("data.cutmix_prob", "it makes its own views", config.data.cutmix_prob > 0),
        ("train.tta_flip", "its accuracy is the kNN monitor's", train.tta_flip),
        ("model.freeze_encoder", "it trains the encoder", config.model.freeze_encoder),
        # Each micro-batch would gather only its own projections: its negatives would not be the global batch's.
        ("train.grad_accum_steps > 1", "NT-Xent's negatives must be the whole global batch's; use more devices "
         "or a smaller train.global_batch_size", train.grad_accum_steps > 1),
        # The gather of the global batch's projections would sit inside the compiled pass (on TPUs it is ignored).
        ("train.xla", "its global-batch gather cannot sit inside the compiled pass on GPUs and CPUs",
         train.xla and not config.runtime.tpu),
    ) if used]
    if refused:
        raise ConfigError("train.task simclr cannot use " + "; ".join(f"{key} ({why})" for key, why in refused))


def train_augmentation(config: Config) -> Augmentation:
    """Two views of every image, from its own random numbers (data/augment.py's scheme)."""
    from resnet18.autograph import as_written
    from resnet18.data.augment import Augmentation

    return Augmentation("simclr_views", PARAMS_PER_IMAGE, as_written(lambda images, uniforms: two_views(
        images, uniforms, config.simclr)), views=2)


def two_views(images: tf.Tensor, uniforms: tf.Tensor, options: SimCLRConfig) -> tf.Tensor:
    """[k, H, W, 3] uint8 or float images -> [k, 2, H, W, 3] float32 views in 0-255."""
    import tensorflow as tf

    first, second = tf.split(uniforms, 2, axis=1)
    return tf.stack([_view(images, first, options), _view(images, second, options)], axis=1)


def _view(images: tf.Tensor, u: tf.Tensor, options: SimCLRConfig) -> tf.Tensor:
    import tensorflow as tf

    count = tf.shape(images)[0]
    size = tf.shape(images)[1:3]
    pixels = tf.cast(images, tf.float32) / 255.0
    # Random resized crop: area fraction and log aspect ratio uniform, the box placed uniformly.
    area = options.crop_scale_min + (1.0 - options.crop_scale_min) * u[:, 0]
    ratio = tf.exp(np.log(3 / 4) + (np.log(4 / 3) - np.log(3 / 4)) * u[:, 1])
    height = tf.minimum(tf.sqrt(area / ratio), 1.0)
    width = tf.minimum(tf.sqrt(area * ratio), 1.0)
    top, left = (1.0 - height) * u[:, 2], (1.0 - width) * u[:, 3]
    flip = u[:, 4] < 0.5  # a flipped box: x2 < x1 mirrors the crop
    x1 = tf.where(flip, left + width, left)
    x2 = tf.where(flip, left, left + width)
    boxes = tf.stack([top, x1, top + height, x2], axis=1)
    pixels = tf.image.crop_and_resize(pixels, boxes, tf.range(count), size, method="bilinear")
    jitter = (u[:, 5] < options.color_jitter_probability)[:, None, None, None]
    pixels = tf.where(jitter, _color_jitter(pixels, u[:, 6:10], options), pixels)
    gray = tf.image.rgb_to_grayscale(pixels)
    pixels = tf.where((u[:, 10] < options.grayscale_probability)[:, None, None, None],
                      tf.tile(gray, [1, 1, 1, 3]), pixels)
    return tf.clip_by_value(pixels, 0.0, 1.0) * 255.0


def _color_jitter(pixels: tf.Tensor, u: tf.Tensor, options: SimCLRConfig) -> tf.Tensor:
    """Brightness, contrast, saturation (factors in [1 - s, 1 + s]) and hue (shift in [-h, h]) per image."""
    import tensorflow as tf

    def factor(column: int, strength: float) -> tf.Tensor:
        return (1.0 - strength + 2.0 * strength * u[:, column])[:, None, None, None]

    pixels = tf.clip_by_value(pixels * factor(0, options.brightness), 0.0, 1.0)
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(pixels), axis=[1, 2, 3], keepdims=True)
    pixels = tf.clip_by_value((pixels - mean) * factor(1, options.contrast) + mean, 0.0, 1.0)
    gray = tf.image.rgb_to_grayscale(pixels)
    pixels = tf.clip_by_value(gray + (pixels - gray) * factor(2, options.saturation), 0.0, 1.0)
    hsv = tf.image.rgb_to_hsv(pixels)
    hue = tf.math.floormod(hsv[..., 0] + (u[:, 3] * 2.0 - 1.0)[:, None, None] * options.hue, 1.0)
    return tf.image.hsv_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], axis=-1))


# --- Model -----------------------------------------------------------------------------------

def build_network(config: Config, num_classes: int, precision: str = "float32") -> keras.Model:
    """Images -> projections: the encoder of `config`'s network and the projection head."""
    import keras

    from resnet18.models import build_model, encoder_of
    from resnet18.models.layers import DTYPE_POLICIES

    encoder = encoder_of(build_model(config, num_classes, precision))
    policy = DTYPE_POLICIES[precision]
    features = encoder.output
    hidden = config.simclr.projection_hidden or int(features.shape[-1])
    seed = config.runtime.seed * 1000 + 999
    x = keras.layers.Dense(hidden, use_bias=False, name="projection_hidden", dtype=policy,
                           kernel_initializer=keras.initializers.HeNormal(seed))(features)
    x = keras.layers.BatchNormalization(synchronized=config.model.sync_bn, name="projection_bn", dtype=policy)(x)
    x = keras.layers.ReLU(name="projection_relu", dtype=policy)(x)
    outputs = keras.layers.Dense(config.simclr.projection_dim, name="projection_out", dtype="float32",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(x)
    return keras.Model(encoder.input, outputs, name=f"simclr_{encoder.name}")


# --- Loss ------------------------------------------------------------------------------------

def make_objective(setting: Setting, model: keras.Model, resuming: bool) -> Objective:  # noqa: ARG001
    """NT-Xent per view over the global batch of 2B views; "correct" counts anchors whose positive is nearest."""
    import tensorflow as tf

    from resnet18.autograph import as_written

    config = setting.config

    @as_written
    def contrastive(views, targets):  # noqa: ARG001 - no labels in self-supervised training
        shape = tf.shape(views)
        pairs = tf.reshape(views, tf.concat([[2 * shape[0]], shape[2:]], 0))  # view 1, view 2, view 1, ...
        projections = tf.reshape(model(pairs, training=True), [shape[0], 2, -1])
        losses, correct = nt_xent(projections[:, 0], projections[:, 1], config.simclr.temperature)
        # Half the found positives: the loop divides by images, and there are two anchors per image.
        return losses, tf.reduce_sum(correct) / 2.0, 2 * config.train.global_batch_size

    return contrastive


def nt_xent(first: tf.Tensor, second: tf.Tensor, temperature: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-anchor NT-Xent of this replica's 2b anchors against the global batch's 2B projections.

    `first`, `second`: [b, d] projections of the two views of this replica's images. Outside a
    multi-replica context the global batch is the local one. Returns ([2b] float32 losses, [2b]
    1.0 where the positive is the anchor's most similar view): divide the losses' sum by 2B
    (tf.nn.compute_average_loss) for the mean over the global batch.
    """
    import tensorflow as tf

    first = tf.math.l2_normalize(tf.cast(first, tf.float32), axis=1)
    second = tf.math.l2_normalize(tf.cast(second, tf.float32), axis=1)
    local = tf.shape(first)[0]
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        all_first = context.all_gather(first, axis=0)  # differentiable: gradients summed over replicas
        all_second = context.all_gather(second, axis=0)
        offset = tf.cast(context.replica_id_in_sync_group, tf.int32) * local
    else:
        all_first, all_second, offset = first, second, 0
    total = tf.shape(all_first)[0]
    positives = offset + tf.range(local)
    self_mask = tf.one_hot(positives, total) * LARGE  # an anchor is not its own negative

    def anchor_losses(anchors, same_view, other_view):
        with_other = tf.matmul(anchors, other_view, transpose_b=True) / temperature  # the positive is here
        with_same = tf.matmul(anchors, same_view, transpose_b=True) / temperature - self_mask
        logits = tf.concat([with_other, with_same], axis=1)
        labels = tf.one_hot(positives, 2 * total)
        found = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), positives)
        return tf.nn.softmax_cross_entropy_with_logits(labels, logits), tf.cast(found, tf.float32)

    (loss_a, found_a), (loss_b, found_b) = (anchor_losses(first, all_first, all_second),
                                            anchor_losses(second, all_second, all_first))
    return tf.concat([loss_a, loss_b], 0), tf.concat([found_a, found_b], 0)


# --- kNN monitor -----------------------------------------------------------------------------

def knn_predict(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, num_classes: int,
                k: int, temperature: float, chunk: int = 512) -> np.ndarray:
    """Weighted kNN: the class with the most exp(cosine / temperature) among the k nearest training features."""
    import tensorflow as tf

    train = tf.math.l2_normalize(tf.constant(train_features, tf.float32), axis=1)
    labels = tf.one_hot(tf.constant(train_labels, tf.int32), num_classes)
    k = min(k, len(train_labels))
    predictions = []
    for start in range(0, len(test_features), chunk):
        test = tf.math.l2_normalize(tf.constant(test_features[start:start + chunk], tf.float32), axis=1)
        similarity, neighbours = tf.math.top_k(tf.matmul(test, train, transpose_b=True), k=k)
        votes = tf.reduce_sum(tf.gather(labels, neighbours) * tf.exp(similarity / temperature)[..., None], axis=1)
        predictions.append(tf.argmax(votes, axis=1, output_type=tf.int32).numpy())
    return np.concatenate(predictions)


def make_evaluation(setting: Setting, model: keras.Model, source: Source,
                    sync_statistics: Callable[[], None]) -> Evaluate:
    """The kNN monitor: its accuracy (as test_accuracy) and confusion matrix, from the encoder's features.

    Both splits are read in order (data/pipeline.py: distributed_ordered), and every worker
    gathers every replica's features, so all compute the same result.
    """
    import tensorflow as tf

    from resnet18.data.pipeline import distributed_ordered, eval_steps, static_batch
    from resnet18.models import encoder_of

    strategy, options, batch = setting.strategy, setting.config.simclr, setting.config.train.global_batch_size
    encoder, num_classes = encoder_of(model), source.num_classes
    train_dataset, train_steps = distributed_ordered(strategy, source.train, batch), eval_steps(source.num_train, batch)
    test_dataset, test_steps = distributed_ordered(strategy, source.test, batch), eval_steps(source.num_test, batch)

    @tf.function
    def features_of(iterator, steps):
        outputs = tf.TensorArray(tf.float32, size=steps)
        labels = tf.TensorArray(tf.int32, size=steps)
        masks = tf.TensorArray(tf.float32, size=steps)
        for step in tf.range(steps):
            images, batch_labels, mask = next(iterator)
            features = strategy.run(lambda x: tf.cast(encoder(*static_batch(batch, x), training=False), tf.float32),
                                    args=(images,))
            outputs = outputs.write(step, strategy.gather(features, axis=0))
            labels = labels.write(step, strategy.gather(batch_labels, axis=0))
            masks = masks.write(step, strategy.gather(mask, axis=0))
        return outputs.concat(), labels.concat(), masks.concat()

    def collect(dataset, steps):
        features, labels, mask = (value.numpy() for value in features_of(iter(dataset), tf.constant(steps)))
        keep = mask > 0
        return features[keep], labels[keep]

    def evaluate() -> dict[str, Any]:
        sync_statistics()
        train_features, train_labels = collect(train_dataset, train_steps)
        test_features, test_labels = collect(test_dataset, test_steps)
        predicted = knn_predict(train_features, train_labels, test_features, num_classes, options.knn_k,
                                options.knn_temperature)
        confusion = np.zeros([num_classes, num_classes], int)
        np.add.at(confusion, (test_labels, predicted), 1)
        accuracy = float(np.mean(predicted == test_labels))
        return {"test_accuracy": accuracy, "knn_accuracy": accuracy, "test_examples": int(len(test_labels)),
                "confusion_matrix": confusion.tolist()}

    return evaluate


TASK = Task(
    name="simclr",
    sections=("simclr",),
    heads=HEADS,
    exports="encoder",
    accuracy="kNN monitor on the encoder's features",
    metrics=("test_accuracy",),
    check=check,
    build_network=build_network,
    train_augmentation=train_augmentation,
    make_objective=make_objective,
    make_evaluation=make_evaluation,
)
