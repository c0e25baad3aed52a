"""AutoGraph: our graph code is traced as written; what a task brings is still converted.

AutoGraph rewrites each function it converts from its source (about 0.1 s each, in every
process); resnet18/autograph.py says which functions it still sees.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from resnet18.config import Config, TrainConfig
from resnet18.training.optimizers import make_optimizer
from resnet18.training.schedules import make_schedule
from resnet18.training.step import make_train_calls, make_train_step
from tests.conftest import REPO, TINY_JOB, environment_without_cluster
from tests.helpers_tiny_model import SIMCLR, batch, encoder_and_head, objective, small_model

# Runs the tiny job in this process, then lists the functions AutoGraph converted: each conversion is
# loaded from a file as a module named __autograph_generated_file*, defining tf__<the function's name>.
CONVERSIONS = """
import pathlib, re, sys
from launcher.__main__ import main
code = main(sys.argv[1:])
print("converted:", sorted(name for module_name, module in list(sys.modules.items())
                            if module_name.startswith("__autograph_generated_file")
                            for name in re.findall(r"def (tf__\\w+)", pathlib.Path(module.__file__).read_text())))
sys.exit(code)
"""


@pytest.mark.slow
def test_a_training_process_converts_only_the_two_loops_that_need_autograph(tiny_data_dir, tmp_path):
    # The train and evaluation loops run `for _ in tf.range(steps)`: a graph loop, AutoGraph's job.
    # Everything else was converted too (19 functions, 1.6 s of each process on 2 cores of Zen 3).
    result = subprocess.run(
        [sys.executable, "-c", CONVERSIONS, "--job", TINY_JOB, "--strategy", "one_device", "--workdir",
         str(tmp_path), "--set", f"data.data_dir={tiny_data_dir}", "train.epochs=1"],
        cwd=REPO, env=environment_without_cluster(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "converted: ['tf__eval_loop', 'tf__train_calls']" in result.stdout, result.stdout[-2000:]


def test_a_tasks_objective_keeps_autograph_inside_our_step_traced_as_written():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    config = Config(train=TrainConfig(global_batch_size=8, weight_decay=0.0))  # the loss is the objective alone
    images, labels = batch(8)

    def first_loss(doubled: bool) -> float:
        with strategy.scope():
            model = small_model(seed=3)
            optimizer = make_optimizer(config, make_schedule(config, steps_per_epoch=10), model=model)
            optimizer.build(model.trainable_variables)

        def objective(images, targets):
            per_example = tf.nn.softmax_cross_entropy_with_logits(targets, model(images, training=True))
            if doubled and tf.reduce_min(per_example) >= 0.0:  # a tensor: only AutoGraph makes this a tf.cond
                per_example = per_example * 2.0
            return per_example, tf.constant(0.0), 8

        calls = make_train_calls(strategy, make_train_step(model, optimizer, objective, config, 10), 8)
        dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((images, labels)))
        loss, _ = calls(iter(dataset), tf.constant(1))
        return float(loss)

    plain = first_loss(doubled=False)
    assert first_loss(doubled=True) == 2.0 * plain  # exact: a doubling; the same weights, data and order
    assert np.isfinite(plain) and plain > 0


def test_our_augmentations_and_objectives_pass_through_unconverted():
    # Marked as written, a seam's function of ours passes through `converted` as it is: no conversion cost.
    from resnet18.autograph import converted
    from resnet18.data.augment import AUGMENTATIONS
    from resnet18.tasks import task_of

    ours = [augmentation.apply for augmentation in AUGMENTATIONS.values()]
    ours += [task_of(SIMCLR).train_augmentation(SIMCLR).apply, objective(encoder_and_head(), SIMCLR)]
    ours += [objective(small_model(1), Config()), objective(small_model(1), Config(), teacher=small_model(2))]
    for function in ours:
        assert converted(function) is function, function
    assert converted(small_model) is not small_model  # anything else is converted
