"""Export a trained run for serving: SavedModel (TF Serving), TFLite float32 and int8, ONNX.

    python -m launcher.export --workdir runs/cpu_smoke
    python -m launcher.export --workdir runs/cpu_smoke --formats saved_model,tflite_int8
    python -m launcher.export --workdir runs/keras_tutorial_recipe --weights best

Restores the newest readable checkpoint of WORKDIR (or, with --weights best, the
best epoch's, kept when train.best_checkpoint_metric is set) into the ResNet18
that WORKDIR/config.yaml describes (weights only: no pickled or Keras-deserialised
code is ever loaded; the weight average when train.ema_decay is set, as evaluated),
then writes WORKDIR/export/:

    saved_model/1/             serving_default: uint8 images [N, H, W, 3] ->
                               probabilities [N, classes], class_ids [N]
                               (normalisation inside; TF Serving's versioned layout)
    labels.txt                 class names, one per line, in class-id order
    model_float32.tflite       same input/outputs, batch 1
    model_int8.tflite          full-integer: uint8 image in, uint8 probabilities out,
                               calibrated on training images
    model.onnx                 through tf2onnx (when it is installed and converts)
    report.json                per format: file size, test accuracy, change against the
                               checkpoint, median single-image CPU latency (1 thread)

What it reads: WORKDIR/config.yaml and the checkpoint files of WORKDIR/checkpoints (or
best/), each resolved first and refused if it leads outside WORKDIR (a symlink, say);
and, to evaluate each artifact, the test split and 256 training images of the data
set config.yaml names (data.data_dir, data.image_folder or the generated stand-in).

Exit codes: 0 done; 2 bad --formats (or one the run's task does not export, or whose packages
are not installed), no finished
run or checkpoint, a checkpoint file outside the work directory, or a checkpoint that does
not fit the configured model; 1 an export failed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import glob
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

from launcher.flags import FlagParser, run_directory
from resnet18 import config as config_lib
from resnet18.runtime.errors import EXIT_FAILURE, EXIT_OK, LauncherError, SetupError, first_line

FORMATS = ("saved_model", "tflite", "tflite_int8", "onnx")
CALIBRATION_IMAGES = 256
LATENCY_RUNS = 50


def parse_formats(text: str) -> list[str]:
    formats = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise config_lib.ConfigError(f"--formats: unknown {unknown or text!r}; choose from {', '.join(FORMATS)}")
    return formats


# The optional packages a format needs (an extra of setup.cfg), beyond the launcher's own.
FORMAT_PACKAGES = {"onnx": ("tf2onnx", "onnxruntime")}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def _missing(name: str, installed: Callable[[str], bool]) -> tuple[str, str] | None:
    """The packages format `name` lacks and the verb for them, ("tf2onnx", "is"); None when it has them all."""
    missing = [module for module in FORMAT_PACKAGES.get(name, ()) if not installed(module)]
    return (" and ".join(missing), "is" if len(missing) == 1 else "are") if missing else None


def chosen_formats(requested: list[str] | None, offered: tuple[str, ...],
                   installed: Callable[[str], bool] = _installed) -> tuple[list[str], list[str]]:
    """(the formats to write, why each other offered one is left out): `requested` as given, else every
    offered format whose packages are installed."""
    if requested is not None:
        return list(requested), []
    chosen, skipped = [], []
    for name in offered:
        if missing := _missing(name, installed):
            skipped.append(f"{name}: {missing[0]} {missing[1]} not installed (pip install -e '.[{name}]')")
        else:
            chosen.append(name)
    return chosen, skipped


def check_packages(formats: list[str], installed: Callable[[str], bool] = _installed) -> None:
    """Raises SetupError (exit 2) for a format asked for whose packages are not installed."""
    for name in formats:
        if missing := _missing(name, installed):
            raise SetupError(f"--formats {name} needs {missing[0]}, which {missing[1]} not installed: "
                             f"pip install -e '.[{name}]'")


def _confined(workdir: str, path: str) -> str:
    """`path`, resolved, if it lies inside `workdir`; loading never leaves the run's directory."""
    root = os.path.realpath(workdir)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise SetupError(f"{path} resolves outside the work directory {workdir}; refusing to load it")
    return real


def load_trained_model(workdir: str, weights: str = "latest"):
    """(config, source, keras model with the checkpoint's weights, checkpoint prefix).

    `weights`: latest (WORKDIR/checkpoints) or best (WORKDIR/best).
    """
    import tensorflow as tf

    from resnet18.data import sources
    from resnet18.runtime.checkpoint_files import checkpoint_candidates, evaluated_weights, restore_latest_good
    from resnet18.tasks import task_of

    config_path = _confined(workdir, os.path.join(workdir, "config.yaml"))
    if not os.path.isfile(config_path):
        raise SetupError(f"{workdir} holds no run (no config.yaml)")
    config = config_lib.build_config(config_path)
    checkpoints = _confined(workdir, os.path.join(workdir, "checkpoints" if weights == "latest" else "best"))
    candidates = checkpoint_candidates(checkpoints)
    if not candidates:
        hint = ("set train.best_checkpoint_metric to keep one" if weights == "best" else "train first")
        raise SetupError(f"no checkpoint in {checkpoints}; {hint}")
    for prefix in candidates:  # every file a restore could open: the index and all data shards
        for path in glob.glob(glob.escape(prefix) + ".*"):
            _confined(workdir, path)
    source = sources.prepare_source(config.data, workdir)
    model = task_of(config).build_network(config, source.num_classes, "float32")
    # The evaluated weights: the best checkpoint holds them as `model`; training checkpoints
    # hold the weight average (if any) as `ema_model`. The optimizer is not needed for inference.
    name = evaluated_weights(checkpoints, config.train.ema_decay) if weights == "latest" else "model"
    checkpoint = tf.train.Checkpoint(**{name: model})
    try:
        prefix = restore_latest_good(checkpoint, checkpoints)
    except RuntimeError as error:
        raise SetupError(
            f"the checkpoints in {checkpoints} do not fit the model config.yaml describes "
            f"(width {config.model.width}, {source.num_classes} classes): {error}"
        ) from None
    return config, source, model, prefix


class ServingModule:
    """uint8 images -> probabilities and class ids (the model standardises its input itself)."""

    def __init__(self, model, image_size: int):
        import tensorflow as tf

        self.module = tf.Module()
        self.module.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")])
        def serve(images):
            probabilities = tf.nn.softmax(tf.cast(model(images, training=False), tf.float32))
            return {"probabilities": probabilities, "class_ids": tf.argmax(probabilities, -1, output_type=tf.int32)}

        self.module.serve = serve
        self.serve = serve
        self.keras_model = _keras_inference_model(model, image_size)


def _keras_inference_model(model, image_size: int):
    """float images 0-255 -> probabilities, as one Keras model (what the TFLite converter takes).

    Converting from Keras freezes the weights into the file; converting a tf.function that
    reads Keras 3 variables leaves unresolved variable reads in the TFLite graph.
    """
    import keras

    images = keras.Input((image_size, image_size, 3), name="images")
    probabilities = keras.layers.Softmax(dtype="float32", name="probabilities")(model(images, training=False))
    return keras.Model(images, probabilities, name="resnet18_inference")


def _median_latency_ms(run_once: Callable[[], Any]) -> float:
    run_once()  # warm-up
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        run_once()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def labelled_test_images(source):
    """Every test image (uint8) and label, in order."""
    import numpy as np

    from resnet18.data.pipeline import whole_split

    batches = list(whole_split(source.test).as_numpy_iterator())
    return np.concatenate([images for images, _ in batches]), np.concatenate([labels for _, labels in batches])


def _calibration_images(source):
    """CALIBRATION_IMAGES training images spread over the set (a fixed, seeded choice)."""
    import numpy as np
    import tensorflow as tf

    indices = np.random.default_rng(0).permutation(source.num_train)[:CALIBRATION_IMAGES]
    images, _ = source.train.read(tf.constant(np.sort(indices), tf.int64))
    return list(images.numpy())


def _tflite_predict(path: str):
    """(predict(images uint8 [N,H,W,3]) -> class ids, latency of one image) for a .tflite file."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter  # LiteRT's: tf.lite.Interpreter is deprecated for it

    interpreter = Interpreter(model_path=path, num_threads=1)
    interpreter.allocate_tensors()
    input_detail = interpreter.get_input_details()[0]
    output_index = interpreter.get_output_details()[0]["index"]

    def one(image):
        value = image[None].astype(input_detail["dtype"])
        interpreter.set_tensor(input_detail["index"], value)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)[0]

    def predict(images):
        return np.array([int(np.argmax(one(image))) for image in images])

    return predict, one


def export(workdir: str, formats: list[str] | None, weights: str = "latest") -> dict[str, Any]:
    """Writes WORKDIR/export/ and its report.json, as the run's task exports (EXPORTERS); returns the report.

    `formats`: None for every format the task's export has whose packages are installed (the others are
    named on stdout as skipped).

    Raises:
      ConfigError: a format the run's task does not export (exit 2), before anything is written.
    """
    from resnet18.tasks import task_of

    config, source, model, prefix = load_trained_model(workdir, weights)
    kind = task_of(config).exports
    write, offered = EXPORTERS[kind]
    if unsupported := [name for name in formats or () if name not in offered]:
        raise config_lib.ConfigError(f"--formats {','.join(unsupported)}: a train.task {config.train.task} run "
                                     f"exports its {kind} as {', '.join(offered)} only")
    chosen, skipped = chosen_formats(formats, offered)
    for reason in skipped:
        name, _, why = reason.partition(":")
        print(f"{name:12s} skipped:{why}", flush=True)
    os.makedirs(os.path.join(workdir, "export"), exist_ok=True)
    return write(workdir, chosen, config, source, model, prefix)


def export_classifier(workdir: str, formats: list[str], config, source, model, prefix: str) -> dict[str, Any]:
    """A classifier: SavedModel, TFLite float32 and int8, ONNX, each evaluated on the test split."""
    import numpy as np
    import tensorflow as tf

    size = config.data.image_size
    out = os.path.join(workdir, "export")
    with open(os.path.join(out, "labels.txt"), "w", encoding="utf-8") as stream:
        stream.write("\n".join(source.class_names) + "\n")
    module = ServingModule(model, size)
    images, labels = labelled_test_images(source)
    reference = np.concatenate([module.serve(tf.constant(images[i:i + 256]))["class_ids"].numpy()
                                for i in range(0, len(images), 256)])
    checkpoint_accuracy = float(np.mean(reference == labels))
    report: dict[str, Any] = {"checkpoint": prefix, "checkpoint_test_accuracy": checkpoint_accuracy,
                              "test_examples": int(len(labels)), "latency_threads": 1, "artifacts": []}
    one_image = tf.constant(images[:1])

    def record(name: str, path: str, predict, latency_ms: float, runtime: str) -> None:
        predictions = predict(images)
        accuracy = float(np.mean(predictions == labels))
        report["artifacts"].append({
            "format": name, "path": os.path.relpath(path, workdir),
            "file_bytes": _size(path), "test_accuracy": accuracy,
            "accuracy_change_points": 100.0 * (accuracy - checkpoint_accuracy),
            "agreement_with_checkpoint": float(np.mean(predictions == reference)),
            "latency_ms_median": latency_ms, "runtime": runtime,  # what ran (and timed) the artifact
        })
        print(f"{name:12s} {_size(path) / 1e6:8.2f} MB  test accuracy {accuracy:.4f} "
              f"({100.0 * (accuracy - checkpoint_accuracy):+.2f} points)  {latency_ms:.2f} ms/image", flush=True)

    failures = []
    if "saved_model" in formats:
        path = os.path.join(out, "saved_model", "1")
        tf.saved_model.save(module.module, path, signatures={"serving_default": module.serve})
        serving = tf.saved_model.load(path).signatures["serving_default"]
        record("saved_model", path,
               lambda batch: np.concatenate([serving(images=tf.constant(batch[i:i + 256]))["class_ids"].numpy()
                                             for i in range(0, len(batch), 256)]),
               _median_latency_ms(lambda: serving(images=one_image)), f"tensorflow {tf.__version__}")
    for name in ("tflite", "tflite_int8"):
        if name not in formats:
            continue
        converter = tf.lite.TFLiteConverter.from_keras_model(module.keras_model)
        if name == "tflite_int8":
            calibration = _calibration_images(source)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = (  # converted (and so called) within this iteration
                lambda: ([image[None].astype(np.float32)] for image in calibration))  # noqa: B023
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
        path = os.path.join(out, "model_float32.tflite" if name == "tflite" else "model_int8.tflite")
        with open(path, "wb") as stream:
            stream.write(converter.convert())
        predict, one = _tflite_predict(path)
        record(name, path, predict, _median_latency_ms(lambda: one(images[0])),  # noqa: B023 (called here)
               f"ai_edge_litert {importlib.metadata.version('ai-edge-litert')}")
    if "onnx" in formats:
        try:
            path = _export_onnx(module, size, os.path.join(out, "model.onnx"))
            predict, one = _onnx_predict(path)
            record("onnx", path, predict, _median_latency_ms(lambda: one(images[:1])),
                   f"onnxruntime {importlib.metadata.version('onnxruntime')}")
        except Exception as error:  # tf2onnx missing or unable to convert this TensorFlow
            reason = f"{type(error).__name__}: {first_line(error)}"
            failures.append(f"onnx: {reason}")
            report["artifacts"].append({"format": "onnx", "error": reason})
            print(f"onnx         not exported: {reason}", flush=True)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as stream:
        json.dump(report, stream, indent=2)
    report["failures"] = failures
    return report


def export_encoder(workdir: str, formats: list[str], config, source, model, prefix: str  # noqa: ARG001
                   ) -> dict[str, Any]:  # formats: ["saved_model"], the one it offers (EXPORTERS)
    """WORKDIR/export/encoder/1: a SavedModel, uint8 images [N, H, W, 3] -> features [N, D] (SimCLR runs).

    Checked against the checkpoint's encoder on the test images (largest difference reported).
    """
    import numpy as np
    import tensorflow as tf

    from resnet18.models import encoder_of

    encoder = encoder_of(model)
    size = model.input_shape[1]
    module = tf.Module()
    module.encoder = encoder

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")])
    def serve(images):
        return {"features": tf.cast(encoder(images, training=False), tf.float32)}

    module.serve = serve
    path = os.path.join(workdir, "export", "encoder", "1")
    tf.saved_model.save(module, path, signatures={"serving_default": serve})
    images, _ = labelled_test_images(source)
    images = images[:512]
    loaded = tf.saved_model.load(path).signatures["serving_default"]
    exported = loaded(images=tf.constant(images))["features"].numpy()
    expected = tf.cast(encoder(tf.constant(images), training=False), tf.float32).numpy()
    report = {"checkpoint": prefix, "failures": [], "artifacts": [{
        "format": "encoder_saved_model", "path": os.path.relpath(path, workdir), "file_bytes": _size(path),
        "feature_dim": int(exported.shape[1]), "max_abs_difference": float(np.max(np.abs(exported - expected)))}]}
    with open(os.path.join(workdir, "export", "report.json"), "w", encoding="utf-8") as stream:
        json.dump(report, stream, indent=2)
    print(f"encoder      {_size(path) / 1e6:8.2f} MB  images -> {exported.shape[1]} features "
          f"(largest difference from the checkpoint {report['artifacts'][0]['max_abs_difference']:.2e})", flush=True)
    return report


# Task.exports -> what `python -m launcher.export` writes for it, and the --formats it offers.
EXPORTERS: dict[str, tuple[Callable[..., dict[str, Any]], tuple[str, ...]]] = {
    "classifier": (export_classifier, FORMATS),
    "encoder": (export_encoder, ("saved_model",)),
}


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
    return os.path.getsize(path)


def _export_onnx(module: ServingModule, size: int, path: str) -> str:
    import tensorflow as tf
    import tf2onnx  # optional: pip install -e '.[onnx]'

    spec = (tf.TensorSpec([None, size, size, 3], tf.uint8, name="images"),)
    tf2onnx.convert.from_function(module.serve, input_signature=spec, opset=17, output_path=path)
    return path


def _onnx_predict(path: str):
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    class_ids = next(index for index, output in enumerate(session.get_outputs()) if "class_ids" in output.name)

    def one(batch):
        return session.run(None, {input_name: batch})

    def predict(images):
        return np.concatenate([one(images[i:i + 256])[class_ids] for i in range(0, len(images), 256)])

    return predict, one


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = FlagParser(prog="python -m launcher.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=run_directory, help="work directory of a trained run")
    parser.add_argument("--formats", help=f"comma-separated: {', '.join(FORMATS)} (default: every format the "
                                           "run's task exports whose packages are installed; an encoder is a "
                                           "saved_model only)")
    parser.add_argument("--weights", choices=("latest", "best"), default="latest",
                        help="the newest checkpoint, or the best epoch's (train.best_checkpoint_metric)")
    try:
        args = parser.parse_args(argv)
        formats = parse_formats(args.formats) if args.formats is not None else None
        check_packages(formats or [])  # before the run is read: nothing written, nothing to wait for
        report = export(args.workdir, formats, args.weights)
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    if report["failures"]:
        print("error: " + "; ".join(report["failures"]), file=sys.stderr, flush=True)
        return EXIT_FAILURE
    print(f"Wrote {os.path.join(args.workdir, 'export')}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
