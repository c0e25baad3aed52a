"""train_and_evaluate: the custom tf.distribute training loop for ResNet18.

One function, read top to bottom: data, model and optimizer (inside the
strategy scope), checkpoint restore, the loop (several steps per tf.function
call, loss averaged over the global batch), evaluation each epoch, TensorBoard,
checkpoints and the run summary. Keras 3 `Model.fit` is not used: it fails
under MultiWorkerMirroredStrategy (keras-team/keras#20585), a custom loop works
with every strategy.

    python -m launcher --job jobs/cpu_smoke.yaml      # runs this through the CLI
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from launcher import config as config_lib
from launcher.config import Config
from resnet18.errors import RetryableError, SetupError, TrainingError
from launcher.preemption import PreemptionWatcher
from launcher.report import write_report
from launcher.strategy import describe, is_chief
from resnet18 import callbacks
from resnet18 import data as data_lib
from resnet18 import hardware
from resnet18.checkpointing import holds_object, remove_stale_temporaries, restore_latest_good
from resnet18.ema import WeightAverage
from resnet18.model import build_resnet18
from resnet18.optimization import make_optimizer, make_schedule, make_train_step

_IMPORT_TIME = time.time()
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def resolve_precision(precision: str, strategy: tf.distribute.Strategy) -> str:
    """`auto` -> the fastest precision the strategy's devices compute natively (hardware.py)."""
    devices = " ".join(strategy.extended.worker_devices)
    kind = "TPU" if "TPU" in devices else "GPU" if "GPU" in devices else "CPU"
    capability = None
    if kind == "GPU":
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        capability = details.get("compute_capability", (0, 0))
    return hardware.resolve_precision(precision, kind, capability)


def train_and_evaluate(config: Config, strategy: tf.distribute.Strategy, workdir: str) -> dict[str, Any]:
    """Trains and evaluates ResNet18 under `strategy`; resumes from WORKDIR/checkpoints.

    Returns the run summary (also written to WORKDIR/summary.json by the chief).

    Raises:
      SetupError: the data set is missing (exit 2).
      TrainingError: the loss became NaN or infinite (exit 1).
    """
    wall_start = time.time()
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    chief = is_chief(strategy)
    num_replicas = strategy.num_replicas_in_sync
    config_lib.check_batch_divisible(config, num_replicas)
    global_batch = config.train.global_batch_size
    if chief:  # tf.io.gfile: the work directory may be a bucket (gs://...)
        tf.io.gfile.makedirs(workdir)
        with tf.io.gfile.GFile(os.path.join(workdir, "config.yaml"), "w") as stream:
            stream.write(config_lib.dump(config))

    if config.train.xla and isinstance(strategy, tf.distribute.TPUStrategy):
        # A TPU compiles every step with XLA anyway; a nested jit_compile function would only get in the way.
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, xla=False))
        if chief:
            print("train.xla: ignored on TPUs (every step is compiled already)", flush=True)
    precision = resolve_precision(config.train.precision, strategy)
    if precision != config.train.precision and chief:
        print(f"Precision: {precision} (train.precision auto)", flush=True)

    # --- Data -------------------------------------------------------------------------
    source = data_lib.prepare_source(config.data, workdir)
    steps_per_epoch = data_lib.steps_per_epoch(source, global_batch)
    total_steps = config.train.epochs * steps_per_epoch
    eval_dataset = strategy.distribute_datasets_from_function(
        data_lib.eval_dataset_fn(source, config.data, global_batch)
    )
    num_input_pipelines = _num_input_pipelines(strategy)
    eval_steps = data_lib.eval_steps(source, global_batch, num_input_pipelines)

    # --- Model, optimizer and checkpoint (every variable inside the strategy scope) -----
    with strategy.scope():
        model = build_model(config, source.num_classes, precision)
        schedule = make_schedule(config, steps_per_epoch)  # the loop lowers its scale on a plateau
        optimizer = make_optimizer(config, schedule, precision, model)
        optimizer.build(model.trainable_variables)
        # The global step: with loss scaling, optimizer.iterations skips steps with inf gradients.
        step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                   aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_counter)
        average = None
        if config.train.ema_decay:  # same seed: the average starts equal to the model
            average = WeightAverage(model, build_model(config, source.num_classes, precision),
                                    config.train.ema_decay)
            checkpoint.ema_model = average.model
    # What evaluation, the best checkpoint and exports use.
    evaluated_model = average.model if average else model
    # Every worker restores the chief's latest good checkpoint (WORKDIR must be shared
    # storage); only the chief keeps what it saves, the others save into a directory they
    # delete (saving may use collectives, so every worker must take part).
    chief_checkpoint_dir = os.path.join(workdir, "checkpoints")
    if chief:
        for path in remove_stale_temporaries(chief_checkpoint_dir):
            print(f"Removed {path}, left by an interrupted save", flush=True)
    try:
        # A weight average turned on for a run whose checkpoints have none starts from the restored weights.
        average_is_new = average is not None and not holds_object(chief_checkpoint_dir, "ema_model")
        restore_target = checkpoint
        if average_is_new:
            restore_target = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_counter)
        restored = restore_latest_good(restore_target, chief_checkpoint_dir)
        if average_is_new and restored:
            average.copy_weights()
            if chief:
                print("train.ema_decay is new for this run: the weight average starts from the restored weights",
                      flush=True)
    except RuntimeError as error:
        raise SetupError(str(error)) from None
    start_step = int(step_counter.numpy())
    _check_same_on_every_worker(strategy, start_step, workdir)
    if chief and restored:
        print(f"Resuming from {restored} at step {start_step}/{total_steps}", flush=True)
    checkpoint_dir = chief_checkpoint_dir if chief else tempfile.mkdtemp(prefix="ckpt_worker_")
    manager = tf.train.CheckpointManager(
        checkpoint, checkpoint_dir, max_to_keep=config.train.checkpoint_max_to_keep
    )
    best_metric = config.train.best_checkpoint_metric
    best_dir = os.path.join(workdir, "best") if chief else os.path.join(checkpoint_dir, "best")
    best_manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=evaluated_model), best_dir, max_to_keep=1)

    train_dataset = strategy.distribute_datasets_from_function(
        data_lib.train_dataset_fn(
            source, config.data, global_batch, config.train.epochs, config.runtime.seed, start_step
        )
    )
    num_classes = source.num_classes
    train_step = make_train_step(model, optimizer, config, num_classes, average)

    @tf.function
    def train_loop(iterator, num_steps):
        loss_sum = tf.constant(0.0)
        correct_sum = tf.constant(0.0)
        for _ in tf.range(num_steps):
            loss, correct = strategy.run(train_step, args=next(iterator))
            loss_sum += strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
            correct_sum += strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)
        return loss_sum, correct_sum

    def eval_step(images, labels, mask):
        logits = tf.cast(evaluated_model(images, training=False), tf.float32)
        if config.train.tta_flip:  # mean logits of the image and its mirror image
            mirrored = tf.cast(evaluated_model(tf.reverse(images, axis=[2]), training=False), tf.float32)
            logits = (logits + mirrored) / 2.0
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        predictions = tf.argmax(logits, -1, output_type=tf.int32)
        correct = tf.cast(tf.equal(predictions, labels), tf.float32)
        confusion = tf.math.confusion_matrix(labels, predictions, num_classes, weights=mask, dtype=tf.float32)
        return tf.reduce_sum(per_example * mask), tf.reduce_sum(correct * mask), tf.reduce_sum(mask), confusion

    @tf.function
    def eval_loop(iterator):
        totals = [tf.constant(0.0)] * 3 + [tf.zeros([num_classes, num_classes])]
        for _ in tf.range(eval_steps):
            results = strategy.run(eval_step, args=next(iterator))
            totals = [total + strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                      for total, value in zip(totals, results)]
        return totals

    # Keras creates BN moving statistics with aggregation NONE: each replica (and worker)
    # updates only its own copy. Averaging them before every evaluation and save keeps
    # evaluation, checkpoints and the weights on every worker identical.
    statistics = model.non_trainable_variables + (average.model.non_trainable_variables if average else [])

    @tf.function
    def sync_moving_statistics():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(variable.value) for variable in statistics])
            for variable, mean in zip(statistics, means):
                variable.assign(mean)
        strategy.run(replica_fn)

    def evaluate() -> dict[str, float]:
        if num_replicas > 1:
            sync_moving_statistics()
        loss_sum, correct, count, confusion = eval_loop(iter(eval_dataset))
        loss_sum, correct, count = float(loss_sum), float(correct), float(count)
        if int(round(count)) != source.num_test:
            raise TrainingError(f"evaluation counted {count:.0f} examples, expected {source.num_test}")
        return {"test_loss": loss_sum / count, "test_accuracy": correct / count, "test_examples": int(count),
                "confusion_matrix": np.rint(confusion.numpy()).astype(int).tolist()}

    @tf.function
    def weights_are_finite():
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(weight, tf.float32)))
                              for weight in model.weights])

    last_saved = {"path": restored}

    def save(step: int, statistics_synced: bool = False) -> None:
        """Checkpoints at `step` on every worker; never writes non-finite weights."""
        if num_replicas > 1 and not statistics_synced:
            sync_moving_statistics()
        if not bool(weights_are_finite()):
            raise TrainingError(
                f"weights became NaN/Inf by step {step}; stopping without saving "
                f"(the last good checkpoint, {last_saved['path']}, is kept)"
            )
        step_counter.assign(step)
        last_saved["path"] = manager.save(checkpoint_number=step)
        if chief:
            print(f"Checkpoint at step {step}: {last_saved['path']}", flush=True)

    @tf.function
    def count_flags(flag):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(flag)), axis=None)

    def preemption_agreed() -> bool:
        """True on every worker when any worker got SIGTERM (one all-reduce per loop call)."""
        if num_input_pipelines == 1:
            return watcher.requested
        return float(count_flags(tf.constant(1.0 if watcher.requested else 0.0))) > 0

    # The tutorial's callbacks (ReduceLROnPlateau, EarlyStopping, best checkpoint) decide from
    # every epoch's test metrics so far, so a resumed run replays the recorded epochs (callbacks.py).

    def apply_epoch_rules(epochs_so_far: list[dict[str, Any]]) -> int | None:
        """Sets the plateau learning-rate scale; returns the early-stopping epoch, if reached."""
        losses = [entry["test_loss"] for entry in epochs_so_far]
        train = config.train
        if train.lr_schedule == "plateau":
            scale = callbacks.plateau_scale(losses, train.plateau_factor, train.plateau_patience,
                                            train.plateau_min_delta)
            if chief and scale != float(schedule.scale.numpy()) and epochs_so_far:
                print(f"ReduceLROnPlateau: learning rate x{scale:g} of its schedule (test_loss has not "
                      f"improved by {train.plateau_min_delta:g} for {train.plateau_patience} epochs)", flush=True)
            schedule.scale.assign(scale)
        if train.early_stopping_patience:
            return callbacks.early_stop_epoch(losses, train.early_stopping_patience, train.early_stopping_min_delta)
        return None

    def save_if_best(epochs_so_far: list[dict[str, Any]]) -> None:
        if best_metric and callbacks.best_epoch(epochs_so_far, best_metric) == len(epochs_so_far) - 1:
            path = best_manager.save(checkpoint_number=epochs_so_far[-1]["step"])  # every worker takes part
            if chief:
                print(f"Best {best_metric} so far ({epochs_so_far[-1][best_metric]:.4f}): {path}", flush=True)

    # --- Loop --------------------------------------------------------------------------
    # Every worker reads the history (shared WORKDIR): the epoch rules must decide alike everywhere.
    earlier_history = [entry for entry in read_history(workdir) if entry["step"] <= start_step]
    if chief and len(earlier_history) != start_step // steps_per_epoch:
        print(f"warning: {workdir}/history.jsonl holds {len(earlier_history)} of the {start_step // steps_per_epoch} "
              "finished epochs; plateau, early stopping and the best epoch replay only those", flush=True)
    stopped_at_epoch = apply_epoch_rules(earlier_history)
    previous_seconds = earlier_history[-1].get("train_seconds", 0.0) if earlier_history else 0.0
    writers = _summary_writers(workdir) if chief else {}
    every = config.train.checkpoint_every_steps
    watcher = PreemptionWatcher()
    try:
        steps_per_loop = config.train.steps_per_loop
        iterator = iter(train_dataset)
        step = start_step
        history: list[dict[str, float]] = []
        train_seconds = 0.0
        train_images = 0
        metrics: dict[str, float] = {}
        first_call = True
        startup_seconds = None  # process start -> end of the first training step
        all_train_seconds = previous_seconds  # every training call, compilation included, across restarts
        while step < total_steps and stopped_at_epoch is None:
            epoch = step // steps_per_epoch
            epoch_end = (epoch + 1) * steps_per_epoch
            progress = keras.utils.Progbar(epoch_end - step, stateful_metrics=["loss", "accuracy", "img/s"],
                                           verbose=1 if chief and sys.stdout.isatty() else 0)
            if chief:
                print(f"Epoch {epoch + 1}/{config.train.epochs}", flush=True)
            loss_total, correct_total, epoch_steps, epoch_seconds = 0.0, 0.0, 0, 0.0
            while step < epoch_end:
                next_checkpoint = (step // every + 1) * every if every else epoch_end
                # The first call runs one step: it traces and compiles, and a user sees progress soon.
                chunk = min(1 if first_call else steps_per_loop, epoch_end - step, next_checkpoint - step)
                started = time.perf_counter()
                loss_sum, correct_sum = train_loop(iterator, tf.constant(chunk))
                loss_sum = float(loss_sum)  # waits for the steps to finish
                elapsed = time.perf_counter() - started
                if not math.isfinite(loss_sum):
                    raise TrainingError(
                        f"loss is {loss_sum} in steps {step + 1}-{step + chunk}; stopping "
                        f"(the last good checkpoint, {last_saved['path']}, is kept)"
                    )
                if not first_call:  # the first call traces and compiles; leave it out of images/s
                    train_seconds += elapsed
                    train_images += chunk * global_batch
                elif startup_seconds is None:
                    startup_seconds = time.time() - process_start_time()
                first_call = False
                all_train_seconds += elapsed
                step += chunk
                epoch_seconds += elapsed
                loss_total += loss_sum
                correct_total += float(correct_sum)
                epoch_steps += chunk
                images_per_sec = chunk * global_batch / elapsed
                progress.add(chunk, [("loss", loss_total / epoch_steps),
                                     ("accuracy", correct_total / (epoch_steps * global_batch)),
                                     ("img/s", images_per_sec)])
                _write_scalars(writers.get("train"), step, {
                    "loss": loss_sum / chunk, "accuracy": float(correct_sum) / (chunk * global_batch),
                    "learning_rate": float(optimizer.learning_rate), "images_per_sec": images_per_sec})
                saved = False
                if every and step % every == 0 and step < epoch_end:
                    save(step)
                    saved = True
                if preemption_agreed():
                    if not saved:
                        save(step)
                    raise RetryableError(f"preempted (SIGTERM): checkpoint saved at step {step}; "
                                         "run again to resume")

            metrics = evaluate()
            confusion = metrics.pop("confusion_matrix")
            metrics.update(epoch=epoch + 1, step=step, train_loss=loss_total / epoch_steps,
                           train_accuracy=correct_total / (epoch_steps * global_batch),
                           learning_rate=float(optimizer.learning_rate),
                           train_seconds=all_train_seconds, elapsed_seconds=time.time() - wall_start)
            history.append(metrics)
            metrics = dict(metrics, confusion_matrix=confusion)
            if chief:  # every epoch since step 0, across restarts (the report plots it)
                _write_history(workdir, earlier_history + history)
            _write_scalars(writers.get("test"), step, {"loss": metrics["test_loss"], "accuracy": metrics["test_accuracy"]})
            # Best first: a crash between the two saves then replays this epoch on resume (the newest
            # checkpoint is the previous one), so WORKDIR/best never misses a recorded best epoch.
            save_if_best(earlier_history + history)
            save(step, statistics_synced=True)  # evaluate() has just averaged them
            stopped_at_epoch = apply_epoch_rules(earlier_history + history)
            if stopped_at_epoch and chief:
                print(f"EarlyStopping: test_loss has not improved for {config.train.early_stopping_patience} "
                      f"epochs; stopping after epoch {stopped_at_epoch}", flush=True)
            if chief:
                print(f"epoch {epoch + 1}/{config.train.epochs}  step {step}/{total_steps}  "
                      f"loss {metrics['train_loss']:.4f}  accuracy {metrics['train_accuracy']:.4f}  "
                      f"test_loss {metrics['test_loss']:.4f}  test_accuracy {metrics['test_accuracy']:.4f}  "
                      f"{epoch_steps * global_batch / epoch_seconds:.0f} img/s", flush=True)

        if not metrics:  # nothing left to train: the work directory already holds the final step
            metrics = evaluate()
            if chief:
                reason = f"early stopping after epoch {stopped_at_epoch}" if stopped_at_epoch else f"step {step}"
                print(f"Training already complete ({reason}); evaluated the final checkpoint", flush=True)

        # --- Summary -----------------------------------------------------------------------
        fingerprint = weights_fingerprint(model)
        print(f"Final weights sha256 {fingerprint}", flush=True)  # equal on every worker
        summary = {
            "name": config.name,
            "test_accuracy": metrics["test_accuracy"],
            "test_loss": metrics["test_loss"],
            "test_examples": metrics["test_examples"],
            "epochs": config.train.epochs,
            "steps": step,
            "resumed_from_step": start_step,
            "stopped_early_after_epoch": stopped_at_epoch,
            "best_checkpoint": _best_checkpoint_entry(earlier_history + history, best_metric, workdir),
            "global_batch_size": global_batch,
            **describe(strategy),
            "train_images_per_sec": train_images / train_seconds if train_seconds else None,
            "startup_seconds": startup_seconds,
            "wall_seconds": time.time() - wall_start,
            "tensorflow_version": tf.__version__,
            "precision": precision,
            "weights_sha256": fingerprint,
            "class_names": list(source.class_names),
            "confusion_matrix": metrics["confusion_matrix"],
            "history": history,
        }
        if chief:
            with tf.io.gfile.GFile(os.path.join(workdir, "summary.json"), "w") as stream:
                stream.write(json.dumps(summary, indent=2))
            try:
                write_report(workdir)
            except Exception as error:  # the run itself succeeded; say so and how to retry
                print(f"warning: the report failed ({error}); run python -m launcher.report --workdir {workdir}",
                      flush=True)
            ips = summary["train_images_per_sec"]
            print(f"Done: test_accuracy {summary['test_accuracy']:.4f}  test_loss {summary['test_loss']:.4f}  "
                  f"steps {step}  {summary['num_replicas']} replica(s) of {summary['strategy']}  "
                  f"{'%.0f img/s  ' % ips if ips else ''}{summary['wall_seconds']:.0f} s  -> {workdir}", flush=True)
        for writer in writers.values():
            writer.close()
        return summary
    finally:
        watcher.close()
        if not chief:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def build_model(config: Config, num_classes: int, precision: str = "float32") -> keras.Model:
    """The ResNet18 a config describes (architecture, precision, seed)."""
    return build_resnet18(
        num_classes=num_classes,
        width=config.model.width,
        image_size=config.data.image_size,
        dtype_policy=DTYPE_POLICIES[precision],
        seed=config.runtime.seed,
        se=config.model.se,
        sync_bn=config.model.sync_bn,
    )


def _best_checkpoint_entry(history: list[dict[str, Any]], metric: str | None, workdir: str) -> dict[str, Any] | None:
    index = callbacks.best_epoch(history, metric) if metric else None
    if index is None:
        return None
    entry = history[index]
    path = os.path.join(workdir, "best", f"ckpt-{entry['step']}")
    return {"metric": metric, "value": entry[metric], "epoch": entry["epoch"], "path": path,
            "on_disk": tf.io.gfile.exists(path + ".index")}


def process_start_time() -> float:
    """When this process started (epoch seconds), for start-up time."""
    try:
        import psutil  # installed with tensorflow-datasets

        return psutil.Process().create_time()
    except ImportError:
        return _IMPORT_TIME


def read_history(workdir: str) -> list[dict[str, Any]]:
    """The per-epoch metrics in WORKDIR/history.jsonl (empty if there are none)."""
    path = os.path.join(workdir, "history.jsonl")
    if not tf.io.gfile.exists(path):
        return []
    entries = []
    with tf.io.gfile.GFile(path) as stream:
        for number, line in enumerate(stream, start=1):
            try:
                entries.append(json.loads(line)) if line.strip() else None
            except json.JSONDecodeError:  # a torn write on storage without atomic rename
                print(f"warning: {path} line {number} is not JSON; ignoring it", flush=True)
    return entries


def _write_history(workdir: str, history: list[dict[str, Any]]) -> None:
    # Rewritten whole (object stores such as gs:// cannot append), into a temporary file renamed
    # over the old one: a crash mid-write leaves the previous history, which the epoch rules replay.
    path = os.path.join(workdir, "history.jsonl")
    with tf.io.gfile.GFile(path + ".tmp", "w") as stream:
        stream.write("".join(json.dumps(entry) + "\n" for entry in history))
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 of every weight's bytes (trainable and BN statistics), to compare runs and workers."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.asarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def _check_same_on_every_worker(strategy: tf.distribute.Strategy, start_step: int, workdir: str) -> None:
    """All workers must resume from the same step, or their weights would differ."""
    if _num_input_pipelines(strategy) == 1:
        return
    # ReduceOp has no MIN/MAX: equal values are those whose variance is 0, seen alike by all.
    value = tf.constant(float(start_step), tf.float64)

    @tf.function
    def mean_moments():
        moments = strategy.run(lambda: tf.stack([value, value * value]))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, moments, axis=None)

    total, total_squares = mean_moments().numpy()
    if total_squares - total * total > 0.25:
        raise SetupError(
            f"workers found different checkpoints in {workdir} (this worker: step {start_step}); "
            "the work directory must be storage every worker sees (a shared volume or a bucket)"
        )


def _num_input_pipelines(strategy: tf.distribute.Strategy) -> int:
    """One input pipeline per worker process (what InputContext will report)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and resolver is not None:
        spec = resolver.cluster_spec().as_dict()
        return max(1, sum(len(spec.get(role, [])) for role in ("chief", "worker")))
    return 1


def _summary_writers(workdir: str) -> dict[str, Any]:
    root = os.path.join(workdir, "tensorboard")
    return {split: tf.summary.create_file_writer(os.path.join(root, split)) for split in ("train", "test")}


def _write_scalars(writer, step: int, scalars: dict[str, float]) -> None:
    if writer is None:
        return
    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.scalar(name, value)
