"""SimCLR: NT-Xent against numpy, global negatives proven by replicas and workers, views, LARS, the kNN
monitor, and a short pre-training whose encoder beats a random one (kNN and linear evaluation)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from launcher.cluster import environment_without_cluster
from launcher.processes import free_ports
from launcher.strategy import make_strategy
from resnet18.config import RuntimeConfig, SimCLRConfig
from resnet18.training.optimizers import LARS
from resnet18.tasks.simclr import PARAMS_PER_IMAGE, knn_predict, nt_xent, two_views
from resnet18.training.loop import train_and_evaluate
from tests.conftest import REPO
from tests.helpers_tiny_model import LABELS, SIMCLR, VIEWS, encoder_and_head, replicated_steps
from tests.test_loop import micro_config

TEMPERATURE = 0.5


def numpy_nt_xent(first: np.ndarray, second: np.ndarray, temperature: float) -> np.ndarray:
    """The SimCLR paper's loss, written out: 2N views, each anchor's positive against the other 2N - 2."""
    views = np.concatenate([first, second])
    views = views / np.linalg.norm(views, axis=1, keepdims=True)
    count = len(first)
    similarity = views @ views.T / temperature
    losses = []
    for anchor in range(2 * count):
        positive = (anchor + count) % (2 * count)
        others = [j for j in range(2 * count) if j != anchor]
        losses.append(-similarity[anchor, positive] + np.log(np.sum(np.exp(similarity[anchor, others]))))
    return np.array(losses)


def test_nt_xent_is_the_papers_loss():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    losses, found = nt_xent(tf.constant(first, tf.float32), tf.constant(second, tf.float32), TEMPERATURE)
    np.testing.assert_allclose(losses.numpy(), numpy_nt_xent(first, second, TEMPERATURE), rtol=1e-5)
    same, found_same = nt_xent(tf.constant(first, tf.float32), tf.constant(first, tf.float32), TEMPERATURE)
    assert found_same.numpy().all()  # identical views: each finds its positive


def test_two_replicas_train_on_the_global_batchs_negatives(two_replicas):
    # Each replica holds 8 images (16 views) but its anchors meet the other replica's 16 views as
    # negatives too: the steps are those of one device holding all 32 views, to float32 round-off.
    one = replicated_steps(make_strategy(RuntimeConfig(strategy="one_device")), SIMCLR, VIEWS, LABELS, 3,
                           encoder_and_head)
    two = replicated_steps(two_replicas, SIMCLR, VIEWS, LABELS, 3, encoder_and_head)
    for single, double in zip(one, two):
        np.testing.assert_allclose(double, single, rtol=1e-5, atol=1e-6)


def test_negatives_from_one_replica_only_would_be_another_objective():
    # What the test above rules out: the loss of two halves on their own is not the global loss.
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    global_mean = numpy_nt_xent(first, second, TEMPERATURE).mean()
    local_mean = np.mean([numpy_nt_xent(first[:4], second[:4], TEMPERATURE),
                          numpy_nt_xent(first[4:], second[4:], TEMPERATURE)])
    assert abs(global_mean - local_mean) > 0.1


WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    sys.path.insert(0, {repo!r})
    from launcher.cluster import read_tf_config
    from launcher.strategy import make_strategy
    from resnet18.config import RuntimeConfig
    strategy = make_strategy(RuntimeConfig(strategy="multi_worker"), read_tf_config())  # before TF starts otherwise
    from tests.helpers_tiny_model import LABELS, SIMCLR, VIEWS, encoder_and_head, replicated_steps
    from tests.helpers_tiny_model import LABELS, SIMCLR, VIEWS, encoder_and_head
    weights = replicated_steps(strategy, SIMCLR, VIEWS, LABELS, 3, encoder_and_head)
    print(json.dumps([weight.tolist() for weight in weights]))
""")


@pytest.mark.slow
def test_two_workers_train_on_the_global_batchs_negatives(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=REPO))
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=environment_without_cluster(
                                      TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(
                                          {"cluster": cluster, "task": {"type": "worker", "index": index}})))
                 for index in range(2)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-3000:]
        results.append([np.array(weight) for weight in json.loads(out.strip().splitlines()[-1])])
    one = replicated_steps(make_strategy(RuntimeConfig(strategy="one_device")), SIMCLR, VIEWS, LABELS, 3,
                           encoder_and_head)
    for worker in results:
        for single, mine in zip(one, worker):
            np.testing.assert_allclose(mine, single, rtol=1e-5, atol=1e-6)


def test_two_views_are_seeded_different_and_in_range():
    images = tf.cast(tf.random.stateless_uniform([4, 32, 32, 3], [1, 2], 0, 255, tf.int32), tf.uint8)
    uniforms = tf.random.stateless_uniform([4, PARAMS_PER_IMAGE], [3, 4])
    views = two_views(images, uniforms, SimCLRConfig())
    assert views.shape == (4, 2, 32, 32, 3) and views.dtype == tf.float32
    assert float(tf.reduce_min(views)) >= 0 and float(tf.reduce_max(views)) <= 255
    np.testing.assert_array_equal(views, two_views(images, uniforms, SimCLRConfig()))
    assert not np.allclose(views[:, 0], views[:, 1])  # the two views of an image differ
    # Area 1 and aspect ratio 1 (the middle of its log-uniform range): the whole image, or its mirror.
    whole = uniforms.numpy()
    whole[:, [1, 1 + PARAMS_PER_IMAGE // 2]] = 0.5
    plain = two_views(images, tf.constant(whole), SimCLRConfig(crop_scale_min=1.0, color_jitter_probability=0.0,
                                                               grayscale_probability=0.0))
    for image, view in zip(images.numpy().astype(np.float32), plain[:, 0].numpy()):  # whole crop: image or mirror
        assert np.allclose(view, image, atol=1e-3) or np.allclose(view, image[:, ::-1], atol=1e-3)


def test_lars_scales_each_layers_rate_by_its_trust_ratio_and_spares_batch_norm():
    kernel = keras.Variable(np.array([[3.0, 4.0]], np.float32), name="kernel")  # ||w|| = 5
    gamma = keras.Variable(np.array([1.0, 1.0], np.float32), name="gamma")
    optimizer = LARS(learning_rate=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.001)
    optimizer.build([kernel, gamma])
    optimizer.adapted = [True, False]  # the second plays a batch-norm gamma
    gradient = np.array([[0.0, 1.0]], np.float32)
    optimizer.apply_gradients([(tf.constant(gradient), kernel), (tf.constant([0.5, 0.5]), gamma)])
    decayed = gradient + 0.01 * np.array([[3.0, 4.0]])
    rate = 0.1 * 0.001 * 5.0 / np.linalg.norm(decayed)
    np.testing.assert_allclose(kernel.numpy(), [[3.0, 4.0]] - rate * decayed, rtol=1e-6)
    np.testing.assert_allclose(gamma.numpy(), [1.0 - 0.05, 1.0 - 0.05], rtol=1e-6)  # plain rate, no decay


def test_knn_votes_weigh_neighbours_by_similarity():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    test = np.array([[1, 0.05], [0.05, 1], [-1, 0.1]], np.float32)
    assert knn_predict(train, labels, test, 3, k=2, temperature=0.1).tolist() == [0, 1, 2]


@pytest.mark.slow
def test_a_short_pretraining_beats_a_random_encoder_by_knn_and_by_linear_evaluation(tiny_data_dir, tmp_path):
    strategy = make_strategy(RuntimeConfig(strategy="one_device"))
    data = [f"data.data_dir={tiny_data_dir}", "data.source=generated", "data.generated.train_examples=640",
            "data.generated.test_examples=250",
            "model.width=8", "train.global_batch_size=64", "train.precision=float32", "simclr.knn_k=20"]
    # LARS and synchronized BN as jobs/simclr_pretrain.yaml; a milder crop (30 %-100 % of the area) for 32x32
    # images of 640 examples seen 10 times. LARS moves each layer by at most rate x 0.001 of its norm a step:
    # at 4.0 per 256 images, 100 steps left the loss near chance (4.73, ln 127 = 4.84) and kNN at the seed's
    # luck (0.196-0.452 over seeds 0-4); at 16 per 256, 0.31-0.90 on oneDNN and Eigen (AMD Zen 3, no native
    # bfloat16; benchmarks/RESULTS.md).
    pretrain = micro_config(tiny_data_dir, *data, "train.task=simclr", "train.optimizer=lars", "model.sync_bn=true",
                            "train.learning_rate=16.0", "train.epochs=10", "train.warmup_epochs=1",
                            "simclr.crop_scale_min=0.3")
    random_init = micro_config(tiny_data_dir, *data, "train.task=simclr", "train.learning_rate=1e-12",
                               "train.epochs=1")
    trained = train_and_evaluate(pretrain, strategy, str(tmp_path / "pretrain"))
    untrained = train_and_evaluate(random_init, strategy, str(tmp_path / "random"))
    linear = [*data, "model.freeze_encoder=true", "train.epochs=6", "train.learning_rate=0.4",
              "train.weight_decay=0"]
    on_trained = train_and_evaluate(micro_config(tiny_data_dir, *linear, f"train.init_from={tmp_path / 'pretrain'}"),
                                    strategy, str(tmp_path / "linear"))
    on_random = train_and_evaluate(micro_config(tiny_data_dir, *linear, f"train.init_from={tmp_path / 'random'}"),
                                   strategy, str(tmp_path / "linear_random"))
    print(f"kNN accuracy: {trained['test_accuracy']:.3f} after 10 epochs of SimCLR, "
          f"{untrained['test_accuracy']:.3f} random encoder; linear evaluation: {on_trained['test_accuracy']:.3f} "
          f"on the pre-trained encoder, {on_random['test_accuracy']:.3f} on the random one")
    assert trained["test_accuracy"] > untrained["test_accuracy"] + 0.1
    assert on_trained["test_accuracy"] > on_random["test_accuracy"] + 0.1
    export = subprocess.run([sys.executable, "-m", "launcher.export", "--workdir", str(tmp_path / "pretrain")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    report = json.loads((tmp_path / "pretrain" / "export" / "report.json").read_text())
    assert report["artifacts"][0]["feature_dim"] == 64 and report["artifacts"][0]["max_abs_difference"] < 1e-4


@pytest.mark.parametrize("fused", [True, False])
def test_lars_adapts_exactly_the_conv_and_dense_kernels_of_the_real_network(fused):
    # The SimCLR network as built for training: encoder (fused or Keras batch norm) and projection head.
    import dataclasses

    from resnet18.models import decayed_kernels
    from resnet18.tasks.simclr import build_network

    config = dataclasses.replace(SIMCLR, model=dataclasses.replace(SIMCLR.model, width=4),
                                 train=dataclasses.replace(SIMCLR.train, deterministic=not fused))
    model = build_network(config, 10)
    optimizer = LARS(learning_rate=0.1)
    optimizer.build(model.trainable_variables)
    kernels = {id(kernel) for kernel in decayed_kernels(model)}
    adapted = {variable.path for variable, adapts in zip(model.trainable_variables, optimizer.adapted) if adapts}
    assert adapted == {variable.path for variable in model.trainable_variables if id(variable) in kernels}
    spared = {variable.path.rsplit("/", 1)[1] for variable in model.trainable_variables if variable.path not in adapted}
    assert spared == {"gamma", "beta", "bias"}  # batch norm's and the last dense layer's bias


def test_export_refuses_formats_an_encoder_does_not_have_and_writes_nothing(micro_data_dir, tmp_path, capsys):
    # A SimCLR run exports its encoder as a SavedModel only; --formats tflite_int8,onnx used to write that
    # SavedModel alone, say "Wrote ..." and exit 0.
    from launcher.export import main as export_main

    workdir = tmp_path / "pretrain"
    train_and_evaluate(micro_config(micro_data_dir, "train.task=simclr", "simclr.knn_k=5"),
                       make_strategy(RuntimeConfig(strategy="one_device")), str(workdir))
    assert export_main(["--workdir", str(workdir), "--formats", "saved_model,tflite_int8,onnx"]) == 2
    assert "--formats tflite_int8,onnx: a train.task simclr run exports its encoder as saved_model only" in \
        capsys.readouterr().err
    assert not (workdir / "export").exists()
    assert export_main(["--workdir", str(workdir)]) == 0 and (workdir / "export" / "encoder" / "1").is_dir()
