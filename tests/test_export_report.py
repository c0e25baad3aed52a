"""Export (SavedModel, TFLite float/int8, ONNX) and the training report, on a trained tiny run."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from launcher.report import write_report
from launcher.serving import grpc_predict_request, rest_request_body
from resnet18.data import sources
from resnet18.config import build_config
from tests.serving_simulator import run_grpc_request, run_rest_request

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(smoke_run):
    """The smoke job's run (1,000 test images); its report was written by the chief."""
    result, workdir = smoke_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return workdir


def run_module(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


@pytest.fixture(scope="module")
def exported(trained):
    process = run_module("launcher.export", "--workdir", str(trained))
    report_path = trained / "export" / "report.json"
    return process, json.loads(report_path.read_text()) if report_path.exists() else None


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_run_writes_a_report_with_readable_plots(trained):
    report = trained / "report"
    for name in ("curves.png", "confusion_matrix.png"):
        width, height = png_size(report / name)
        assert width >= 600 and height >= 400, (name, width, height)
    per_class = json.loads((report / "per_class_accuracy.json").read_text())
    assert list(per_class)[:2] == ["airplane", "automobile"] and len(per_class) == 10
    markdown = (report / "report.md").read_text()
    for words in ("test accuracy", "OneDeviceStrategy", "images/s", "wall time", "hardware", "```yaml", "curves.png"):
        assert words in markdown
    summary = json.loads((trained / "summary.json").read_text())
    assert sum(map(sum, summary["confusion_matrix"])) == summary["test_examples"]
    history = [json.loads(line) for line in (trained / "history.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in history] == list(range(1, summary["epochs"] + 1))


@pytest.mark.slow
def test_report_on_demand_and_for_a_missing_run(trained, tmp_path):
    (trained / "report" / "curves.png").unlink()
    written = write_report(str(trained))
    assert any(path.endswith("curves.png") for path in written) and (trained / "report" / "curves.png").exists()
    result = run_module("launcher.report", "--workdir", str(tmp_path), timeout=120)
    assert result.returncode == 2 and "no finished run" in result.stderr


@pytest.mark.slow
def test_a_report_on_demand_of_a_local_run_does_not_start_tensorflow(trained):
    (trained / "report" / "confusion_matrix.png").unlink()
    script = ("import sys; from launcher import report; code = report.main(['--workdir', sys.argv[1]]); "
              "print(sorted(name for name in sys.modules if name.split('.')[0] == 'tensorflow')); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, str(trained)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "[]"
    assert png_size(trained / "report" / "confusion_matrix.png")[0] >= 600


@pytest.mark.slow
def test_every_format_is_exported_and_evaluated(exported):
    process, report = exported
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    artifacts = {artifact["format"]: artifact for artifact in report["artifacts"]}
    assert set(artifacts) == {"saved_model", "tflite", "tflite_int8", "onnx"}
    assert report["checkpoint_test_accuracy"] > 0.4
    assert artifacts["saved_model"]["agreement_with_checkpoint"] == 1.0
    assert artifacts["tflite"]["agreement_with_checkpoint"] > 0.99
    assert artifacts["onnx"]["agreement_with_checkpoint"] > 0.99
    int8, float32 = artifacts["tflite_int8"], artifacts["tflite"]
    assert int8["file_bytes"] <= 0.3 * float32["file_bytes"]
    assert int8["accuracy_change_points"] >= -1.0  # the target: int8 loses at most 1 point
    for artifact in artifacts.values():
        assert artifact["latency_ms_median"] > 0 and artifact["file_bytes"] > 0
    # LiteRT's interpreter runs (and times) the TFLite files, not the deprecated tf.lite.Interpreter.
    assert all(artifacts[name]["runtime"].startswith("ai_edge_litert ") for name in ("tflite", "tflite_int8"))
    assert artifacts["onnx"]["runtime"].startswith("onnxruntime ")


@pytest.mark.slow
def test_saved_model_serves_the_exact_rest_and_grpc_requests(trained, exported):
    process, _ = exported
    assert process.returncode == 0
    serving = tf.saved_model.load(str(trained / "export" / "saved_model" / "1")).signatures["serving_default"]
    config = build_config(str(trained / "config.yaml"))
    source = sources.prepare_source(config.data, str(trained))
    images, _ = source.test.read(tf.range(3, dtype=tf.int64))
    images = images.numpy()
    body = rest_request_body(images)
    assert json.loads(body)["signature_name"] == "serving_default"
    response = run_rest_request(serving, body)
    assert np.asarray(response["probabilities"]).shape == (3, 10)
    assert np.allclose(np.sum(response["probabilities"], axis=1), 1.0, atol=1e-4)
    assert response["class_ids"] == np.argmax(response["probabilities"], axis=1).tolist()
    grpc = run_grpc_request(serving, grpc_predict_request(images))
    assert grpc["class_ids"] == response["class_ids"]
    assert np.allclose(grpc["probabilities"], response["probabilities"])
    labels = (trained / "export" / "labels.txt").read_text().split()
    assert labels[0] == "airplane" and len(labels) == 10


@pytest.mark.parametrize("args, words", [
    (["--formats", "saved_model,pickle"], ["unknown ['pickle']"]),
    ([], ["holds no run"]),
])
def test_bad_export_inputs_exit_2(tmp_path, args, words):
    result = run_module("launcher.export", "--workdir", str(tmp_path), *args, timeout=120)
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr


def test_onnx_asked_for_without_its_packages_exits_2_saying_how_to_install_them(tmp_path):
    script = ("import sys; sys.modules['tf2onnx'] = None  # as if not installed\n"
              "from launcher import export; sys.exit(export.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, "--workdir", str(tmp_path), "--formats", "tflite,onnx"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--formats onnx needs tf2onnx, which is not installed: pip install -e '.[onnx]'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "export").exists()


def test_every_format_by_default_means_every_format_whose_packages_are_installed():
    from launcher.export import FORMATS, chosen_formats

    assert chosen_formats(None, FORMATS, installed=lambda module: True) == (list(FORMATS), [])
    assert chosen_formats(None, FORMATS, installed=lambda module: module != "onnxruntime") == (
        ["saved_model", "tflite", "tflite_int8"], ["onnx: onnxruntime is not installed (pip install -e '.[onnx]')"])
    assert chosen_formats(["tflite"], FORMATS, installed=lambda module: False) == (["tflite"], [])


@pytest.mark.slow
def test_export_of_another_model_shape_exits_2(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("export", "report"))
    config = (copy / "config.yaml").read_text().replace("width: 16", "width: 8")
    (copy / "config.yaml").write_text(config)
    result = run_module("launcher.export", "--workdir", str(copy), "--formats", "saved_model", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "do not fit the model" in result.stderr and "width 8" in result.stderr


@pytest.mark.slow
def test_a_checkpoint_file_that_leads_outside_the_work_directory_is_refused(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("export", "report"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    data = sorted((copy / "checkpoints").glob("ckpt-*.data-00000-of-00001"))[-1]
    shutil.move(data, outside / data.name)
    data.symlink_to(outside / data.name)  # a symlink inside, its target outside
    result = run_module("launcher.export", "--workdir", str(copy), "--formats", "saved_model", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "resolves outside the work directory" in result.stderr and data.name in result.stderr
    assert not (copy / "export" / "saved_model").exists()
