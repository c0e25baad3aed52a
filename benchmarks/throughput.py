"""Throughput benchmark: how much of the hardware the launcher turns into training.

    python -m benchmarks.throughput --json benchmarks/results_cpu.json     # full ResNet18, ~10 min on 2 cores
    python -m benchmarks.throughput --width 4 --batch 32 --steps 2 --skip workers --json /tmp/tiny.json

Measures, in one run so the figures compare as ratios (shared machines are noisy):
  1. model step: train steps on a synthetic batch already on the device, per precision / XLA;
  2. input pipeline alone: the default training augmentation, images/s on this host;
  3. end to end: train_and_evaluate through the real strategy, pipeline and loop;
  4. peak: a large matmul in the same precision -> FLOP/s; the model's training FLOPs per
     image counted from its layers (3 x forward); MFU = model images/s x FLOPs / peak;
  5. the Keras way (the tutorial this project grew from): Model.fit on ImageDataGenerator.flow with
     rotation/shift/zoom/flip, float32;
     and ImageDataGenerator alone;
  6. start-up: process start -> end of the first training steps (a fresh `python -m launcher`);
  7. 2 local workers x 1 replica against one process with --cpu_replicas 2, same global batch.
Writes --json and prints a table with the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

from launcher import cpu_environment
from launcher.cluster import environment_without_cluster
from resnet18.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {  # on the project's 2-core CPU machine, as ratios from one run
    "end_to_end_vs_model": 0.95,
    "pipeline_vs_model": 20.0,
    "pipeline_vs_image_data_generator": 10.0,
    "end_to_end_vs_keras_fit": 2.0,
    "workers_vs_cpu_replicas": 0.85,
}
STARTUP_TARGET_SECONDS = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--width", type=int, default=64, help="ResNet18 width (64 = the real model)")
    parser.add_argument("--batch", type=int, default=TrainConfig().global_batch_size,
                        help="global batch size (default: the launcher's default training configuration)")
    parser.add_argument("--baseline_batch", type=int, default=128, help="batch size of the Keras Model.fit baseline")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--xla", default="false,true", help="XLA settings for the model step")
    parser.add_argument("--batch_norm", default="fused",
                        help="batch-norm kernels for the model step: fused (the default model), keras, or both")
    parser.add_argument("--end_to_end_precision", default="auto",
                        help="precision of the end-to-end run (auto: the launcher's default)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--pipeline_batches", type=int, default=200)
    parser.add_argument("--skip", default="", help="comma-separated: keras_fit, workers, startup")
    args = parser.parse_args(argv)
    unknown = {name.strip() for name in args.batch_norm.split(",")} - {"fused", "keras"}
    if unknown:
        parser.error(f"--batch_norm: unknown {', '.join(sorted(unknown))} (choose fused, keras or fused,keras)")
    return args


def _timed(run, warmup: int, steps: int) -> float:
    """Seconds for `steps` calls of run() after `warmup` untimed ones; run() must block."""
    for _ in range(warmup):
        run()
    started = time.perf_counter()
    for _ in range(steps):
        run()
    return time.perf_counter() - started


def model_flops_per_image(model) -> float:
    """Training FLOPs per image: 3 x the forward multiply-adds x 2 of every conv and dense layer."""
    import keras

    forward = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel_h, kernel_w, channels_in, channels_out = layer.kernel.shape
            _, height, width, _ = layer.output.shape
            forward += 2 * height * width * kernel_h * kernel_w * channels_in * channels_out
        elif isinstance(layer, keras.layers.Dense):
            forward += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return 3.0 * forward


def peak_flops(precision: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a size x size matmul in `precision` on the default device."""
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "bfloat16" else tf.float16 if precision == "float16" else tf.float32
    a = tf.random.stateless_normal([size, size], [1, 2], dtype=dtype)
    b = tf.random.stateless_normal([size, size], [3, 4], dtype=dtype)

    @tf.function
    def matmul():
        return tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32))

    seconds = _timed(lambda: matmul().numpy(), 2, repeats)
    return 2.0 * size**3 * repeats / seconds


def model_step_images_per_sec(config, precision: str, xla: bool, warmup: int, steps: int,
                              batch_norm: str = "fused") -> float:
    """Training steps on one synthetic batch that is already on the device (no input pipeline)."""
    import tensorflow as tf

    from resnet18.models.resnet import build_resnet18
    from resnet18.training.optimizers import make_optimizer
    from resnet18.training.schedules import make_schedule
    from resnet18.models.layers import DTYPE_POLICIES
    from resnet18.tasks.classification import cross_entropy
    from resnet18.training.step import make_train_step

    batch = config.train.global_batch_size
    model = build_resnet18(width=config.model.width, dtype_policy=DTYPE_POLICIES[precision],
                           fused_batch_norm=batch_norm == "fused")
    optimizer = make_optimizer(config, make_schedule(config, steps_per_epoch=100), precision=precision)
    optimizer.build(model.trainable_variables)
    # train.xla compiles the forward and backward pass, exactly as in training.
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, xla=xla))
    train_step = make_train_step(model, optimizer, cross_entropy(model, config, 10), config, num_classes=10)
    images = tf.random.stateless_normal([batch, 32, 32, 3], [5, 6])
    labels = tf.random.stateless_uniform([batch], [7, 8], 0, 10, dtype=tf.int32)

    @tf.function
    def step():
        loss, _ = train_step(images, labels)
        return loss

    seconds = _timed(lambda: step().numpy(), warmup, steps)
    return batch * steps / seconds


def pipeline_images_per_sec(source, config, batches: int) -> float:
    """The training input pipeline alone (default augmentation), on this host."""
    import tensorflow as tf

    from resnet18.data import pipeline
    from resnet18.data.augment import AUGMENTATIONS

    dataset_fn = pipeline.train_dataset_fn(
        source, config.data, AUGMENTATIONS[config.data.augmentation], config.train.global_batch_size, epochs=1000,
        seed=0)
    iterator = iter(dataset_fn(tf.distribute.InputContext(1, 0, 1)))
    for _ in range(20):  # fill the cache and the prefetch buffers
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.train.global_batch_size / (time.perf_counter() - started)


def keras_fit_baseline(source, width: int, batch: int, warmup: int, steps: int) -> tuple[float, float]:
    """(Model.fit on ImageDataGenerator.flow images/s, ImageDataGenerator alone images/s), float32."""
    import tensorflow as tf

    from resnet18.models.resnet import build_resnet18

    # Enough batches for every step: Keras 3 ends a fit epoch when the generator runs out.
    count = min(source.num_train, batch * (max(warmup, steps) + 1))
    images, labels = source.train.read(tf.range(count, dtype=tf.int64))
    images = images.numpy().astype("float32")  # RGB 0-255: the model standardises
    labels = tf.keras.utils.to_categorical(labels.numpy(), 10)
    generator = tf.keras.preprocessing.image.ImageDataGenerator(  # rotation/shift/zoom/flip
        rotation_range=15, width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True, zoom_range=0.1)
    flow = generator.flow(images, labels, batch_size=batch, seed=0)
    generator_seconds = _timed(lambda: next(flow), 2, 20)
    model = build_resnet18(width=width, fused_batch_norm=False)  # the tutorial's Keras layers
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(flow, steps_per_epoch=warmup, epochs=1, verbose=0)
    clock = _step_clock()
    model.fit(flow, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[clock])
    # From the start of training to the end of its last step: the deletion of fit's tf.data
    # iterator afterwards is left out, as the launcher's figure leaves out the end of its run
    # (it sleeps up to a minute in 2 of 4 runs here: see resnet18/data/pipeline.py).
    return batch * steps / (clock.last_step_end - clock.train_begin), 20 * batch / generator_seconds


def _step_clock():
    import keras

    class StepClock(keras.callbacks.Callback):
        """When Model.fit began training and when its last step ended (fit's own steps are synchronous)."""

        def on_train_begin(self, logs=None):
            self.train_begin = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.last_step_end = time.perf_counter()

    return StepClock()


def launcher_summary(args: list[str], workdir: str) -> dict[str, Any]:
    """Runs `python -m launcher ARGS` in a fresh process and returns its summary.json."""
    env = environment_without_cluster()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = subprocess.run([sys.executable, "-m", "launcher", *args, "--workdir", workdir], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"launcher {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as stream:
        return json.load(stream)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tensorflow as tf

    from launcher.strategy import make_strategy
    from resnet18.data import sources
    from resnet18.runtime import hardware
    from resnet18.config import RuntimeConfig, build_config
    from resnet18.training.loop import train_and_evaluate

    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    scratch = tempfile.mkdtemp(prefix="throughput_")
    data_dir = os.path.join(scratch, "tfds")
    train_examples = args.batch * (args.warmup + args.steps) * 2
    overrides = [f"model.width={args.width}", f"train.global_batch_size={args.batch}", "train.epochs=1",
                 f"data.data_dir={data_dir}", "data.source=generated",
                 f"data.generated.train_examples={max(train_examples, 1024)}",
                 f"data.generated.test_examples={args.batch}", f"train.steps_per_loop={args.steps}",
                 "train.checkpoint_every_steps=0"]
    config = build_config(None, overrides)
    strategy = make_strategy(RuntimeConfig(strategy="one_device"))
    device = strategy.extended.worker_devices[0]
    source = sources.prepare_source(config.data, scratch)
    results: dict[str, Any] = {
        "device": device, "device_kind": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "cpu": hardware.cpu_summary(), "cpu_flags": sorted(set(hardware.PRECISION_CPU_FLAGS) & hardware.cpu_flags()),
        "batch": args.batch, "baseline_batch": args.baseline_batch, "width": args.width,
        "tensorflow_version": tf.__version__,
        "date": time.strftime("%Y-%m-%d"), "cpu_environment": cpu_environment.describe(),
        # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN (TensorFlow's CPU kernels) act as on a CPU without AVX-512.
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
    }

    if args.end_to_end_precision == "auto":
        args.end_to_end_precision = hardware.strategy_precision("auto", strategy)
    # 1 and 4: model step and peak, per precision, XLA setting and batch-norm kernel.
    results.update(_model_steps(args, config, device))

    # 2: the input pipeline alone.
    results["pipeline_images_per_sec"] = pipeline_images_per_sec(source, config, args.pipeline_batches)

    # 3: end to end through the real strategy, pipeline and loop, as the launcher trains by default.
    e2e_config = build_config(None, overrides + [f"train.precision={args.end_to_end_precision}"])
    summary = train_and_evaluate(e2e_config, strategy, os.path.join(scratch, "end_to_end"))
    results["end_to_end_images_per_sec"] = summary["train_images_per_sec"]

    # 5: the Keras Model.fit + ImageDataGenerator baseline.
    if "keras_fit" not in skip:
        fit, generator = keras_fit_baseline(source, args.width, args.baseline_batch, args.warmup, args.steps)
        results["keras_fit_images_per_sec"] = fit
        results["image_data_generator_images_per_sec"] = generator

    # 6 and 7: fresh processes.
    common = ["--set", *overrides, f"train.precision={args.end_to_end_precision}"]
    if "startup" not in skip or "workers" not in skip:
        replicas = launcher_summary(["--cpu_replicas", "2", *common], os.path.join(scratch, "cpu_replicas"))
        results["startup_seconds"] = replicas["startup_seconds"]
        results["first_epoch_seconds"] = replicas.get("first_epoch_seconds")
        if "workers" not in skip:
            workers = launcher_summary(["--workers", "2", *common], os.path.join(scratch, "workers"))
            results["cpu_replicas_2_images_per_sec"] = replicas["train_images_per_sec"]
            results["workers_2_images_per_sec"] = workers["train_images_per_sec"]
    results["ratios"] = ratios(results)
    return results


def _model_steps(args: argparse.Namespace, config, device: str) -> dict[str, Any]:
    """Model step and matmul peak per precision, XLA setting and batch-norm kernel; the headline entry."""
    from resnet18.runtime import hardware
    from resnet18.models.resnet import build_resnet18

    flops_per_image = model_flops_per_image(build_resnet18(width=args.width))
    found: dict[str, Any] = {"model_flops_per_image": flops_per_image, "model_step": []}
    precisions = [name.strip() for name in args.precisions.split(",") if name.strip()]
    if "CPU" in device and not hardware.has_native_bfloat16(hardware.cpu_flags()) and "bfloat16" in precisions:
        precisions.remove("bfloat16")  # the launcher refuses it here: emulated, several times slower
        found["skipped"] = "bfloat16: this CPU has no native bfloat16 (AVX512_BF16/AMX_BF16)"
        print(f"skipped {found['skipped']}", flush=True)
    batch_norms = [name.strip() for name in args.batch_norm.split(",") if name.strip()]
    for precision in precisions:
        peak = peak_flops(precision)
        for xla in (value.strip() == "true" for value in args.xla.split(",")):
            for batch_norm in batch_norms:
                images_per_sec = model_step_images_per_sec(config, precision, xla, args.warmup, args.steps,
                                                           batch_norm)
                found["model_step"].append({
                    "precision": precision, "xla": xla, "batch_norm": batch_norm, "images_per_sec": images_per_sec,
                    "peak_flops": peak, "mfu": images_per_sec * flops_per_image / peak})
    reference = next(entry for entry in found["model_step"]  # the model the launcher trains
                     if entry["precision"] == args.end_to_end_precision and not entry["xla"]
                     and entry["batch_norm"] == batch_norms[0])
    found.update(precision=args.end_to_end_precision, model_images_per_sec=reference["images_per_sec"],
                 peak_flops=reference["peak_flops"], mfu=reference["mfu"])
    return found


def ratios(results: dict[str, Any]) -> dict[str, float]:
    model = results["model_images_per_sec"]
    found = {
        "end_to_end_vs_model": results["end_to_end_images_per_sec"] / model,
        "pipeline_vs_model": results["pipeline_images_per_sec"] / model,
    }
    if "keras_fit_images_per_sec" in results:
        found["pipeline_vs_image_data_generator"] = (
            results["pipeline_images_per_sec"] / results["image_data_generator_images_per_sec"])
        found["end_to_end_vs_keras_fit"] = results["end_to_end_images_per_sec"] / results["keras_fit_images_per_sec"]
    if "workers_2_images_per_sec" in results:
        found["workers_vs_cpu_replicas"] = (
            results["workers_2_images_per_sec"] / results["cpu_replicas_2_images_per_sec"])
    return found


def table(results: dict[str, Any]) -> str:
    lines = [f"ResNet18 width {results['width']}, batch {results['batch']} (Keras fit baseline: "
             f"{results['baseline_batch']}), {results['device']}: "
             f"{results['cpu']}, TensorFlow {results['tensorflow_version']}, {results['date']}",
             f"oneDNN ISA: {results['onednn_max_cpu_isa']}; {results['cpu_environment']}", "",
             f"{'model step':32s} {'images/s':>10s} {'peak GFLOP/s':>13s} {'MFU':>7s}"]
    for entry in results["model_step"]:
        name = f"  {entry['precision']}{' + XLA' if entry['xla'] else ''}"
        if entry.get("batch_norm", "fused") != "fused":
            name += f" ({entry['batch_norm']} batch norm)"
        peak = entry["peak_flops"] / 1e9
        lines.append(f"{name:32s} {entry['images_per_sec']:10.1f} {peak:13.1f} {entry['mfu']:7.1%}")
    lines.append(f"{'model training GFLOP per image':32s} {results['model_flops_per_image'] / 1e9:10.3f}")
    for key in ("pipeline_images_per_sec", "end_to_end_images_per_sec", "keras_fit_images_per_sec",
                "image_data_generator_images_per_sec", "cpu_replicas_2_images_per_sec", "workers_2_images_per_sec"):
        if key in results:
            lines.append(f"{key:32s} {results[key]:10.1f}")
    if results.get("startup_seconds") is not None:
        verdict = "ok" if results["startup_seconds"] <= STARTUP_TARGET_SECONDS else "MISSED"
        lines.append(f"{'startup_seconds':32s} {results['startup_seconds']:10.1f}   target <= "
                     f"{STARTUP_TARGET_SECONDS:.0f}  {verdict}")
    lines += ["", f"{'ratio':32s} {'measured':>10s} {'target':>8s}"]
    for name, value in results["ratios"].items():
        verdict = "ok" if value >= TARGETS[name] else "MISSED"
        lines.append(f"{name:32s} {value:10.2f} {TARGETS[name]:8.2f}  {verdict}")
    return "\n".join(lines)


def publish(results: dict[str, Any], text: str, path: str | None) -> None:
    """Prints a benchmark's table and writes its results to `path` (--json), if given."""
    print(text)
    if path:
        with open(path, "w", encoding="utf-8") as stream:
            json.dump(results, stream, indent=2)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cpu_environment.apply()  # the launcher's own settings (TF_CPU_ALLOCATOR_USE_BFC=0 in the environment overrides)
    args = parse_args(argv)
    results = run(args)
    publish(results, table(results), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
