"""Config layering and rejection of bad input (no TensorFlow needed)."""

from __future__ import annotations

import pytest

from resnet18 import config as config_lib
from resnet18.config import ConfigError, build_config
from tests.conftest import TINY_JOB, run_launcher


def write(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_layering_defaults_job_set_flags():
    config = build_config(TINY_JOB, ["train.epochs=7", "train.learning_rate=0.05"], {"runtime.seed": 9})
    assert config.name == "tiny"  # from the job file
    assert config.model.width == 4  # from the job file
    assert config.train.epochs == 7  # --set beats the job file
    assert config.train.learning_rate == 0.05
    assert config.runtime.seed == 9  # dedicated flags beat --set
    assert config.train.momentum == config_lib.TrainConfig().momentum  # default kept


def test_dump_reads_back_to_the_same_config(tmp_path):
    config = build_config(TINY_JOB, ["data.augmentation=rotate_shift_zoom_flip"])
    again = build_config(write(tmp_path, config_lib.dump(config)))
    assert again == config


@pytest.mark.parametrize("text, words", [
    ("train:\n  epoch: 3\n", ["unknown key 'train.epoch'", "did you mean 'epochs'", "job.yaml"]),
    ("trian:\n  epochs: 3\n", ["unknown key 'trian'", "did you mean 'train'"]),
    ("train:\n  epochs: three\n", ["train.epochs must be int", "'three'"]),
    ("train:\n  epochs: 2.5\n", ["train.epochs must be int"]),
    ("train:\n  epochs: true\n", ["train.epochs must be int"]),
    ("runtime:\n  strategy: off\n", ["runtime.strategy must be one of 'auto', 'one_device'", "quote the value"]),
    ("train:\n  learning_rate: -0.1\n", ["train.learning_rate must be > 0", "-0.1"]),
    ("train:\n  global_batch_size: 0\n", ["train.global_batch_size must be >= 1"]),
    ("runtime:\n  strategy: horovod\n", ["runtime.strategy must be one of"]),
    ("runtime:\n  cpu_replicas: 3\ntrain:\n  global_batch_size: 64\n", ["not divisible by the 3 replicas"]),
    ("train: 5\n", ["train must be a mapping"]),
    ("- a\n- b\n", ["must hold a mapping"]),
    ("train:\n  epochs: [1\n", ["not valid YAML"]),
])
def test_bad_job_files_name_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        build_config(write(tmp_path, text))
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("override, words", [
    ("train.epochs", ["expected key.path=value"]),
    ("train.nope=1", ["unknown key 'train.nope'"]),
    ("model.width=-4", ["model.width must be >= 1"]),
    ("data.generated.train_examples=10", ["data.source generated needs", "data.generated.test_examples > 0"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as error:
        build_config(None, [override])
    for word in words:
        assert word in str(error.value)


def test_a_name_with_directories_inside_runs_still_reads():  # runs written under such names stay readable
    assert build_config(TINY_JOB, ["name=cifar10/width8"]).name == "cifar10/width8"


def test_a_job_file_that_is_not_utf8_is_refused_naming_it(tmp_path):
    path = tmp_path / "windows.yaml"
    path.write_text("name: tiny\n", encoding="utf-16")  # what some editors save
    with pytest.raises(ConfigError, match=f"--job file '{path}' is not UTF-8 text"):
        build_config(str(path))


def test_missing_job_file_is_a_config_error():
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("jobs/no_such_job.yaml")


def test_malicious_yaml_tag_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    job = write(tmp_path, f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = run_launcher("--job", job, "--dry_run", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "not valid YAML" in result.stderr and "job.yaml" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("args, words", [
    (["--set", "train.epoch=3"], ["unknown key 'train.epoch'"]),
    (["--gpus", "many"], ["--gpus: expected an integer"]),
    (["--strategy", "parameter_server"], ["invalid choice"]),
    (["--set", "train.global_batch_size=63", "--cpu_replicas", "2", "--strategy", "mirrored"],
     ["not divisible by the 2 replicas"]),
])
def test_cli_usage_errors_exit_2_before_tensorflow(args, words):
    result = run_launcher("--job", TINY_JOB, *args, "--dry_run", timeout=60)
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum_steps=3", "train.grad_accum_steps 3 does not divide the per-replica batch 64"),
    ("train.best_checkpoint_metric=val_acc",
     "train.best_checkpoint_metric must be one of 'test_accuracy', 'test_loss' or null, got str 'val_acc'"),
    ("train.lr_schedule=onecycle", "train.lr_schedule must be one of 'cosine', 'constant', 'plateau'"),
    ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1)"),
    ("data.cutmix_prob=1.5", "data.cutmix_prob must be in [0, 1]"),
    ("train.weight_decay_mode=adamw", "train.weight_decay_mode must be one of"),
    ("model.se=yes please", "model.se must be bool"),
    # Each passed validation and then failed inside training: a traceback (exit 1), or a dead watchdog thread.
    ("train.warmup_epochs=.inf", "train.warmup_epochs must be a finite number, got inf"),
    ("train.learning_rate=1e400", "train.learning_rate must be a finite number, got inf"),
    ("train.learning_rate=1" + "0" * 400, "train.learning_rate must be a finite number, got inf"),
    ("distill.temperature=.inf", "distill.temperature must be a finite number, got inf"),
    ("train.step_timeout_seconds=1e10", "train.step_timeout_seconds must be in [0, 1e+08]"),
    ("train.epochs=100000000000000000000", "train.epochs must be at most 2147483647, got 100000000000000000000"),
    ("runtime.seed=99999999999999999999", "runtime.seed must be at most 2147483647"),
    ('name=""', "name must be a path inside runs/ (the default work directory is runs/NAME), got ''"),
    ("name=a/../../c", "name must be a path inside runs/"),
    ("name=..", "name must be a path inside runs/"),
    ("name=/etc", "name must be a path inside runs/"),
])
def test_values_a_run_cannot_use_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as raised:
        build_config(TINY_JOB, [override])
    assert message in str(raised.value)


def test_xla_with_sync_batch_norm_is_refused_before_tensorflow_starts():
    with pytest.raises(ConfigError, match="train.xla and model.sync_bn cannot be used together"):
        build_config(TINY_JOB, ["train.xla=true", "model.sync_bn=true"])


def test_a_deprecated_value_still_works_and_names_its_replacement(capsys):
    config = build_config(TINY_JOB, ["data.augmentation=seed"])
    assert config.data.augmentation == "rotate_shift_zoom_flip"
    assert "data.augmentation 'seed' is deprecated; use 'rotate_shift_zoom_flip'" in capsys.readouterr().err


def test_allowed_values_come_from_the_type_for_checks_and_the_command_line():
    from launcher.__main__ import parse_args

    assert config_lib.choices(config_lib.RuntimeConfig, "strategy") == (
        "auto", "one_device", "mirrored", "multi_worker", "tpu")
    assert config_lib.choices(config_lib.TrainConfig, "best_checkpoint_metric") == ("test_accuracy", "test_loss")
    from launcher.flags import FlagError

    with pytest.raises(FlagError, match="--strategy: invalid choice: 'horovod'"):
        parse_args(["--strategy", "horovod"])
    assert parse_args(["--strategy", "tpu"]).strategy == "tpu"


def test_exponents_without_a_dot_are_numbers_although_yaml_reads_them_as_text(tmp_path):
    config = build_config(write(tmp_path, "train:\n  learning_rate: 1e-3\n  weight_decay: 5E-4\n"),
                          ["train.ema_decay=9e-1"])
    assert (config.train.learning_rate, config.train.weight_decay, config.train.ema_decay) == (1e-3, 5e-4, 0.9)
    with pytest.raises(ConfigError, match="train.learning_rate must be float"):
        build_config(None, ["train.learning_rate=fast"])
