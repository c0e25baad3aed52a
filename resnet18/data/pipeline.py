"""Input pipelines: a global order that does not depend on the number of workers or replicas.

Every epoch is one permutation of the training set, a pure function of
(seed, epoch) computed index by index (`tf.random.experimental.index_shuffle`,
nothing materialised). Global step s of epoch e trains on positions
[s*B, (s+1)*B) of that permutation, B the global batch. The R replicas split the
global batch in order: replica r takes positions r*b .. r*b+b-1 (b = B/R), and an
input pipeline (one per worker, or per TPU host) reads only its own replicas'
slice from the store (sources.py). So:

- a run resumed at step s starts exactly there, with no iterator state;
- the examples of step s are the same with 1 or 8 replicas, 1 or 4 workers, so a
  job that continues on fewer workers trains on exactly the examples it would have;
- augmentation is drawn per example from a seed of (seed, step) for the whole
  global batch and sliced the same way, so it does not depend on the split either.

Evaluation walks the test split in order in global batches of B positions; the
positions past the end are padding with mask 0, so every example counts exactly
once, whatever B and the number of replicas.

    python -c "import resnet18.data.pipeline as p; help(p.train_dataset_fn)"
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import tensorflow as tf

from resnet18.autograph import as_written, converted
from resnet18.config import DataConfig
from resnet18.data.augment import Augmentation
from resnet18.data.cutmix import cutmix
from resnet18.data.sources import ExampleStore, Source
from resnet18.runtime.errors import SetupError

# tf.data's autotuner is off, with fixed parallelism instead: its model thread can miss the
# cancellation when an iterator is destroyed and sleep out its optimisation period (up to 60 s).
# Seen with gdb at the end of the smoke job (~RootDataset::Iterator waiting for
# Model::OptimizeLoop); deleting an autotuned iterator after 25 s of use took 15.9 s in 1 of 4
# trials, a fixed one 0.0 s in 6. (The per-device prefetch TensorFlow's distributed iterator adds
# is autotuned and out of our reach: it can still stall the end of a run, less often.) Each map
# call reads and augments a whole global-batch slice, vectorised, so a few calls in flight and two
# steps of prefetch feed the model (pipeline rate against the model's: benchmarks/RESULTS.md).
PARALLEL_BATCHES = max(2, min(os.cpu_count() or 2, 8))
PREFETCH_STEPS = 2


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder, other examples each epoch, is left out)."""
    steps = num_train // global_batch_size
    if steps < 1:
        raise SetupError(
            f"train.global_batch_size {global_batch_size} is larger than the {num_train} training examples")
    return steps


def eval_steps(num_test: int, global_batch_size: int) -> int:
    """Global batches that cover the test split (the last one padded)."""
    return max(1, math.ceil(num_test / global_batch_size))


def epoch_order(positions: tf.Tensor, seed: int, epoch: tf.Tensor, num_examples: int) -> tf.Tensor:
    """The example indices at `positions` of epoch `epoch`'s permutation of the training set."""
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.index_shuffle(tf.cast(positions, tf.int64), epoch_seed, num_examples - 1)


def pipeline_slice(context: tf.distribute.InputContext, global_batch_size: int) -> tuple[int, int, int]:
    """(first position in the global batch, examples, replicas) of this input pipeline."""
    replicas = context.num_replicas_in_sync // context.num_input_pipelines
    examples = replicas * context.get_per_replica_batch_size(global_batch_size)
    return context.input_pipeline_id * examples, examples, replicas


def train_dataset_fn(source: Source, data: DataConfig, augmentation: Augmentation, global_batch_size: int,
                     epochs: int, seed: int, start_step: int = 0, order_log_dir: str | None = None
                     ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """A dataset function for `strategy.distribute_datasets_from_function` (training).

    Each pipeline yields, per global step from `start_step` on, one (images float32 RGB 0-255,
    labels int32) batch per local replica, augmented by `augmentation` (the task's: a task may
    make more than one view per image, e.g. SimCLR's [batch, 2, S, S, 3] pairs); with CutMix
    (`data.cutmix_prob` > 0) the labels are soft targets [batch, classes]. With `order_log_dir`
    each pipeline appends, per step it reads,
    the example ids to ORDER_LOG_DIR/pipeline-<id>-of-<count>-pid<pid>.jsonl (an audit of the data order).
    """
    steps = steps_per_epoch(source.num_train, global_batch_size)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        first, count, replicas = pipeline_slice(context, global_batch_size)
        augment = converted(augmentation.apply)  # the task's: AutoGraph's, as in any tf.function

        @as_written  # and so is everything it calls but the augmentation (resnet18/autograph.py)
        def load(step):
            epoch = step // steps
            positions = (step % steps) * global_batch_size + first + tf.range(count, dtype=tf.int64)
            indices = epoch_order(positions, seed, epoch, source.num_train)
            if order_log_dir:
                indices = _logged(indices, step, context, order_log_dir)
            images, labels = source.train.read(indices)
            step_seed = tf.stack([tf.constant(seed, tf.int64), step])
            uniforms = tf.random.stateless_uniform([global_batch_size, max(augmentation.num_params, 1)], step_seed)
            images = augment(images, uniforms[first:first + count])
            images = tf.reshape(images, [replicas, count // replicas, *augmentation.image_shape(data.image_size)])
            labels = tf.reshape(labels, [replicas, count // replicas])
            if data.cutmix_prob:  # one draw per global step; partners inside each replica's batch
                mix_seed = tf.random.experimental.stateless_fold_in(step_seed, 1)
                images, labels = tf.map_fn(
                    lambda batch: cutmix(batch[0], batch[1], source.num_classes, mix_seed, data.cutmix_alpha,
                                         data.cutmix_prob),
                    (images, labels), fn_output_signature=(tf.float32, tf.float32))
            return images, labels

        dataset = tf.data.Dataset.range(start_step, epochs * steps)
        dataset = dataset.map(load, num_parallel_calls=PARALLEL_BATCHES, deterministic=True)
        return _fixed(dataset.unbatch().prefetch(PREFETCH_STEPS * replicas))  # one element per local replica

    return dataset_fn


def ordered_dataset_fn(store: ExampleStore, global_batch_size: int
                       ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """A dataset function for evaluation: the split in order, (images, labels, mask), every example once.

    Each pipeline yields `eval_steps` batches per local replica; padding examples have
    mask 0 and must not be counted.
    """
    return lambda context: ordered_batches(store, global_batch_size, *pipeline_slice(context, global_batch_size))


def distributed_ordered(strategy: tf.distribute.Strategy, store: ExampleStore, global_batch_size: int):
    """`ordered_dataset_fn`'s dataset, distributed over `strategy`."""
    return strategy.distribute_datasets_from_function(ordered_dataset_fn(store, global_batch_size))


def static_batch(global_batch_size: int, *tensors: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """`tensors` (one replica's batch; call in replica context) with their leading dimension pinned to
    this replica's share of `global_batch_size`.

    MultiWorkerMirroredStrategy's iterator gives each replica a batch of unknown size (it handles partial
    batches, which these pipelines never make), MirroredStrategy's a static one. Grappler optimises the
    two graphs differently (its arithmetic optimizer regroups a residual block's additions only where it
    can prove their shapes equal), so the same data trained different float32 weights on 2 workers and on
    2 replicas. Pinned, every layout runs the same graph.
    """
    batch = global_batch_size // tf.distribute.get_replica_context().num_replicas_in_sync
    return tuple(tf.ensure_shape(tensor, [batch, *tensor.shape[1:]]) for tensor in tensors)


def ordered_batches(store: ExampleStore, global_batch_size: int, first: int, count: int, replicas: int
                    ) -> tf.data.Dataset:
    """The split in order, this pipeline's slice of each global batch, padded and masked at the end."""

    @as_written
    def load(step):
        positions = step * global_batch_size + first + tf.range(count, dtype=tf.int64)
        mask = tf.cast(positions < store.num_examples, tf.float32)
        images, labels = store.read(tf.minimum(positions, store.num_examples - 1))
        per_replica = count // replicas
        return (tf.reshape(images, [replicas, per_replica, *images.shape[1:]]),
                tf.reshape(labels, [replicas, per_replica]), tf.reshape(mask, [replicas, per_replica]))

    dataset = tf.data.Dataset.range(eval_steps(store.num_examples, global_batch_size))
    dataset = dataset.map(load, num_parallel_calls=PARALLEL_BATCHES, deterministic=True)
    return _fixed(dataset.unbatch().prefetch(PREFETCH_STEPS * replicas))


def _fixed(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The dataset without tf.data's autotuner (see PARALLEL_BATCHES)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def whole_split(store: ExampleStore, batch_size: int = 256) -> tf.data.Dataset:
    """Every example of a split once, in order, as (uint8 images, int32 labels) batches (exports, checks)."""
    return ordered_batches(store, batch_size, 0, batch_size, 1).map(as_written(
        lambda images, labels, mask: (tf.boolean_mask(images, mask > 0), tf.boolean_mask(labels, mask > 0))))


def _logged(indices: tf.Tensor, step: tf.Tensor, context: tf.distribute.InputContext, directory: str) -> tf.Tensor:
    """`indices`, after appending them with their step to this pipeline's order log."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"pipeline-{context.input_pipeline_id}-of-{context.num_input_pipelines}"
                                   f"-pid{os.getpid()}.jsonl")

    def append(step_value, values):
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps({"step": int(step_value), "indices": values.tolist()}) + "\n")
        return values

    logged = tf.numpy_function(append, [step, indices], tf.int64, stateful=True)
    logged.set_shape(indices.shape)
    return logged
