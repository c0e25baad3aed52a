"""Job configuration: frozen dataclasses, strict YAML merge, `--set` overrides.

Layering: built-in defaults -> `--job` YAML -> `--set key.path=value` -> flags.
Unknown keys, wrong types and impossible values raise `ConfigError` (exit 2)
naming the key and the file, before TensorFlow is imported.

    python -m launcher --job jobs/cpu_smoke.yaml --set train.epochs=2 --dry_run
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from typing import Any, Literal, Mapping

import yaml

from resnet18.identity import RESUME, TEACHER, WARM_START, must_match
from resnet18.runtime.errors import ConfigError
from resnet18.config_values import checked_value

# The allowed values of a key live in its type: the check, the error message and the
# command line's choices all read them from here (`choices`).
Strategy = Literal["auto", "one_device", "mirrored", "multi_worker", "tpu"]
Augmentation = Literal["crop_flip", "rotate_shift_zoom_flip", "none"]
Optimizer = Literal["sgd", "adam", "lars"]
Task = Literal["classification", "distillation", "simclr"]
Source = Literal["tfds", "image_folder", "generated"]
Schedule = Literal["cosine", "constant", "plateau"]
WeightDecayMode = Literal["l2", "decoupled"]
BestMetric = Literal["test_accuracy", "test_loss"]
Precision = Literal["auto", "float32", "bfloat16", "float16"]
LrScaling = Literal["linear", "none"]
Evaluation = Literal["inline", "sidecar"]
Architecture = Literal["resnet18", "resnet50", "resnext29_8x64d", "resnext29_2x64d"]

# Old keys ignored, with a warning saying why (old values: config_values.DEPRECATED_VALUES).
DEPRECATED_KEYS = {"data.shuffle_buffer": "every epoch is a full permutation of the training set now"}
LONGEST_TIMEOUT_SECONDS = 1e8  # about three years; beyond threading's longest wait the watchdog thread died


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where the job runs: strategy and devices."""

    strategy: Strategy = "auto"  # auto picks from TF_CONFIG, --tpu and the GPUs found
    gpus: int | None = None  # GPUs of this machine to use; None = all found
    cpu_replicas: int = 0  # >0: split the CPU into N logical devices (MirroredStrategy)
    tpu: str | None = None  # TPU name, grpc:// address, or "local" on a TPU VM
    seed: int = dataclasses.field(default=0, metadata=must_match(RESUME))  # model init, data order, augmentation


@dataclasses.dataclass(frozen=True)
class GeneratedDataConfig:
    """A learnable stand-in for CIFAR-10, written in the real binary format."""

    train_examples: int = 0  # 0 = use the real data set
    test_examples: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on and how it is fed."""

    source: Source = dataclasses.field(default="tfds", metadata=must_match(RESUME, TEACHER))  # where images come
    #                from: a TFDS data set (dataset), a folder of images (image_folder), or the generated stand-in
    dataset: str = dataclasses.field(default="cifar10", metadata=must_match(RESUME, TEACHER))  # a TFDS image-
    #                classification name (source tfds; generated data is in CIFAR-10's format)
    image_folder: str | None = dataclasses.field(default=None, metadata=must_match(RESUME, TEACHER))  # source
    #                image_folder: train/<class>/*, test/<class>/*
    data_dir: str | None = None  # TFDS data_dir (local path or gs://); None = TFDS default
    manual_dir: str | None = None  # folder holding cifar-10-binary.tar.gz for offline prep
    generated: GeneratedDataConfig = dataclasses.field(default=GeneratedDataConfig(),  # source generated
                                                       metadata=must_match(RESUME, TEACHER))
    image_size: int = dataclasses.field(default=32, metadata=must_match(RESUME, TEACHER, WARM_START))  # images
    #                of another size are resized to this
    augmentation: Augmentation = "crop_flip"  # crop_flip: pad-4 crop + flip; rotate_shift_zoom_flip: rotation 15°,
    #                                        shift 0.1, zoom 0.1, flip (Keras ImageDataGenerator-style); none
    cutmix_prob: float = 0.0  # share of training batches mixed by CutMix (0 = off)
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) for the kept area; 1 = uniform (the paper's)
    order_log: bool = False  # audit: every input pipeline writes the example ids of each step it reads
    #                          to WORKDIR/order_log/ (read-ahead steps included)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: the CIFAR ResNet18 (or ResNet50, e.g. as a distillation teacher)."""

    arch: Architecture = dataclasses.field(default="resnet18", metadata=must_match(WARM_START))  # resnet50:
    #                bottleneck blocks 3-4-6-3 (23.5 M parameters at width 64); resnext29_8x64d / _2x64d:
    #                ResNeXt-29 with 8 or 2 groups of 64 channels (34.4 M / 9.1 M parameters)
    freeze_encoder: bool = False  # train only the classifier (linear evaluation of a train.init_from encoder)
    width: int = dataclasses.field(default=64, metadata=must_match(WARM_START))  # channels of stage 1; ResNet
    #                stages use width x (1, 2, 4, 8), ResNeXt's bottlenecks width x (1, 2, 4)
    se: bool = dataclasses.field(default=False, metadata=must_match(WARM_START))  # squeeze-and-excitation in
    #                every block (+89,080 parameters, +0.8 %, at width 64 in ResNet18)
    sync_bn: bool = False  # batch-norm moments over the global batch (all replicas), not per replica


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe and loop settings."""

    epochs: int = 30
    global_batch_size: int = dataclasses.field(default=512, metadata=must_match(RESUME))  # summed over all
    #                replicas and workers
    optimizer: Optimizer = dataclasses.field(default="sgd", metadata=must_match(RESUME))  # sgd (Nesterov), adam, or
    #                  lars (SimCLR's large-batch optimizer; weight decay inside it, not as a loss term)
    task: Task = dataclasses.field(default="classification", metadata=must_match(RESUME))  # classification;
    #                  distillation from a teacher (section distill); or simclr: self-supervised pre-training
    #                  of the encoder (section simclr), whose accuracy is the kNN monitor's (resnet18/tasks/)
    init_from: str | None = None  # a work directory whose latest weights start this run (layers matched by
    #                               name: a SimCLR encoder for linear evaluation or fine-tuning)
    learning_rate: float = 0.2  # per 256 images when lr_scaling is linear
    lr_scaling: LrScaling = "linear"  # linear: lr x global_batch / 256, so --gpus 8 needs no edit
    lr_schedule: Schedule = "cosine"  # after warm-up: cosine decay to 0, constant, or plateau (see below)
    warmup_epochs: float = 1.0  # linear warm-up from 0
    plateau_factor: float = 0.1  # plateau: lr x factor after plateau_patience epochs without
    plateau_patience: int = 3  # a test_loss improvement > plateau_min_delta (Keras ReduceLROnPlateau)
    plateau_min_delta: float = 1e-4
    early_stopping_patience: int = 0  # stop after N epochs without a test_loss improvement; 0 = off
    early_stopping_min_delta: float = 0.0  # smaller test_loss changes do not count (Keras EarlyStopping)
    best_checkpoint_metric: BestMetric | None = None  # test_accuracy or test_loss: keep the best epoch in WORKDIR/best
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv and dense kernels only (not BN, not biases)
    weight_decay_mode: WeightDecayMode = "l2"  # l2: loss term (momentum sees it); decoupled: w -= lr x decay x w
    label_smoothing: float = 0.1
    grad_accum_steps: int = 1  # micro-batches per update: same effective batch, 1/N activation memory
    ema_decay: float = 0.0  # >0: evaluate, checkpoint and export an exponential moving average of the weights
    tta_flip: bool = False  # evaluate on the mean logits of each test image and its mirror image
    # XLA-compile the forward+backward pass (meant for GPUs; slower on the CPUs measured; ignored on TPUs).
    xla: bool = False
    precision: Precision = "auto"  # auto: bfloat16 where the hardware has it (TPU, A100+, AVX512-BF16/AMX CPUs),
    #                          float16 (loss-scaled) on V100/T4, else float32; or name one
    steps_per_loop: int = 20  # train steps per tf.function call (host overhead)
    checkpoint_every_steps: int = 100  # also at every epoch end; 0 = epoch ends only
    checkpoint_max_to_keep: int = 3
    deterministic: bool = False  # op determinism, Keras' BN layer: same seed -> bitwise-identical weights
    evaluation: Evaluation = "inline"  # inline: every worker evaluates each epoch; sidecar: an evaluator task does
    step_timeout_seconds: float = 1800.0  # no training call, evaluation or save done in this long: dump the
    #                                       stacks and exit 138 (the first call, which compiles, is exempt); 0 = off


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015) from a teacher this launcher trained (train.task distillation)."""

    # The teacher's work directory (its config.yaml and best, else latest, checkpoint); null = off.
    teacher_workdir: str | None = dataclasses.field(default=None, metadata=must_match(RESUME))
    # loss = alpha x CE(labels) + (1 - alpha) x T^2 x KL(teacher_T || student_T). T = 4 as in CRD's
    # RepDistiller benchmark (Tian et al. 2020) for CIFAR; alpha = 0.5 weighs both terms equally
    # (RepDistiller uses 0.1 / 0.9, Hinton a small CE weight: tune it per pair).
    alpha: float = 0.5
    temperature: float = 4.0


@dataclasses.dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR pre-training (Chen et al. 2020), used when train.task is simclr."""

    temperature: float = 0.5  # NT-Xent tau (the paper's CIFAR-10 setting; 0.1 on ImageNet)
    projection_dim: int = dataclasses.field(default=128, metadata=must_match(RESUME))  # the 2-layer MLP head's
    projection_hidden: int = dataclasses.field(default=0, metadata=must_match(RESUME))  # output; its hidden width
    #                                                                      (0 = the encoder's output width)
    crop_scale_min: float = 0.08  # random resized crop: area in [this, 1], aspect ratio in [3/4, 4/3]
    color_jitter_probability: float = 0.8
    brightness: float = 0.4  # jitter strengths (0.8 x the paper's colour strength 0.5)
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_probability: float = 0.2
    knn_k: int = 200  # kNN monitor: neighbours among the training set's encoder features (cosine)
    knn_temperature: float = 0.1  # their votes weigh exp(similarity / this)


@dataclasses.dataclass(frozen=True)
class Config:
    """One job: everything needed to reproduce a run."""

    name: str = "default"
    runtime: RuntimeConfig = RuntimeConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = dataclasses.field(default=ModelConfig(), metadata=must_match(RESUME))
    train: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig()
    simclr: SimCLRConfig = SimCLRConfig()


def load_yaml_file(path: str, what: str = "job file") -> dict[str, Any]:
    """Reads a job file with `yaml.safe_load` (no Python tags) into a mapping."""
    try:
        with open(path, encoding="utf-8") as stream:
            content = yaml.safe_load(stream)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path!r} is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path!r} is not UTF-8 text (save it as UTF-8)") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path!r} is not valid YAML: {error}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(
            f"{what} {path!r} must hold a mapping of sections "
            f"(runtime, data, model, train), not {type(content).__name__}"
        )
    return content


def parse_override(text: str) -> tuple[str, Any]:
    """Parses one `--set key.path=value`; the value is read as YAML (`5` is an int)."""
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: value {raw_value!r} is not valid YAML: {error}") from None
    return key, value


def nest_overrides(overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Turns [("train.epochs", 5)] into {"train": {"epochs": 5}}."""
    nested: dict[str, Any] = {}
    for key, value in overrides:
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} was already set to a value")
            node = child
        node[parts[-1]] = value
    return nested


def merge(config: Any, updates: Mapping[str, Any], source: str, prefix: str = "") -> Any:
    """Returns a copy of the dataclass `config` with `updates` applied, strictly typed."""
    if not isinstance(updates, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    fields = {field.name: field for field in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, value in updates.items():
        full_key = f"{prefix}{key}"
        if full_key in DEPRECATED_KEYS:
            print(f"warning: {source}: {full_key} is ignored: {DEPRECATED_KEYS[full_key]}", file=sys.stderr, flush=True)
            continue
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {full_key!r}{_suggest(str(key), fields)}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if value is None:
                continue
            changes[key] = merge(current, value, source, f"{full_key}.")
        else:
            changes[key] = checked_value(value, hints[key], full_key, source)
    return dataclasses.replace(config, **changes)


def _suggest(key: str, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    allowed = ", ".join(sorted(fields))
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; allowed keys: {allowed}"


def choices(section: type, key: str) -> tuple[str, ...]:
    """The allowed values of a Literal-typed key, e.g. choices(RuntimeConfig, "strategy")."""
    hint = typing.get_type_hints(section)[key]
    literal = next(kind for kind in (typing.get_args(hint) or (hint,)) if typing.get_origin(kind) is Literal) \
        if typing.get_origin(hint) is not Literal else hint
    return typing.get_args(literal)


def validate(config: Config) -> None:
    """Rejects impossible values; the number of replicas is checked once it is known."""
    checks = [
        (config.runtime.gpus is None or config.runtime.gpus >= 0, "runtime.gpus", ">= 0"),
        (config.runtime.cpu_replicas >= 0, "runtime.cpu_replicas", ">= 0"),
        (config.runtime.seed >= 0, "runtime.seed", ">= 0"),
        (bool(config.data.dataset), "data.dataset", "a TFDS data set name"),
        (config.data.generated.train_examples >= 0, "data.generated.train_examples", ">= 0"),
        (config.data.generated.test_examples >= 0, "data.generated.test_examples", ">= 0"),
        (config.data.image_size >= 8, "data.image_size", ">= 8"),
        (0 <= config.data.cutmix_prob <= 1, "data.cutmix_prob", "in [0, 1]"),
        (config.data.cutmix_alpha > 0, "data.cutmix_alpha", "> 0"),
        (config.model.width >= 1, "model.width", ">= 1"),
        (config.train.epochs >= 1, "train.epochs", ">= 1"),
        (config.train.global_batch_size >= 1, "train.global_batch_size", ">= 1"),
        (config.train.learning_rate > 0, "train.learning_rate", "> 0"),
        (config.train.warmup_epochs >= 0, "train.warmup_epochs", ">= 0"),
        (0 < config.train.plateau_factor < 1, "train.plateau_factor", "in (0, 1)"),
        (config.train.plateau_patience >= 1, "train.plateau_patience", ">= 1"),
        (config.train.plateau_min_delta >= 0, "train.plateau_min_delta", ">= 0"),
        (config.train.early_stopping_patience >= 0, "train.early_stopping_patience", ">= 0"),
        (config.train.early_stopping_min_delta >= 0, "train.early_stopping_min_delta", ">= 0"),
        (config.train.grad_accum_steps >= 1, "train.grad_accum_steps", ">= 1"),
        (0 <= config.train.ema_decay < 1, "train.ema_decay", "in [0, 1)"),
        (0 <= config.train.momentum < 1, "train.momentum", "in [0, 1)"),
        (config.train.weight_decay >= 0, "train.weight_decay", ">= 0"),
        (0 <= config.train.label_smoothing < 1, "train.label_smoothing", "in [0, 1)"),
        (config.train.steps_per_loop >= 1, "train.steps_per_loop", ">= 1"),
        (config.train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", ">= 0"),
        (config.train.checkpoint_max_to_keep >= 1, "train.checkpoint_max_to_keep", ">= 1"),
        (0 <= config.train.step_timeout_seconds <= LONGEST_TIMEOUT_SECONDS, "train.step_timeout_seconds",
         f"in [0, {LONGEST_TIMEOUT_SECONDS:g}] (0: no limit)"),
        (_inside_runs(config.name), "name", "a path inside runs/ (the default work directory is runs/NAME)"),
    ] + _mode_checks(config)
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {_value_of(config, key)!r}")
    _validate_source(config.data)
    if config.train.xla and config.model.sync_bn and not config.runtime.tpu:
        # XLA compiles the pass as a nested function; synchronized BN all-reduces inside it,
        # which TensorFlow's mirrored strategies refuse ("merge_call called while defining a new graph").
        raise ConfigError("train.xla and model.sync_bn cannot be used together on GPUs and CPUs: choose one "
                          "(on TPUs train.xla is ignored: every step is compiled)")
    if config.train.evaluation == "sidecar":
        # These rules decide during training from the test metrics, which a sidecar evaluator
        # produces later, in another task: the run could not decide alike when it resumes.
        needs_test_metrics = [key for key, used in (
            ("train.lr_schedule: plateau", config.train.lr_schedule == "plateau"),
            ("train.early_stopping_patience", config.train.early_stopping_patience > 0),
            ("train.best_checkpoint_metric", config.train.best_checkpoint_metric is not None)) if used]
        if needs_test_metrics:
            raise ConfigError(f"train.evaluation sidecar cannot drive {', '.join(needs_test_metrics)}: they need "
                              "each epoch's test metrics during training; use train.evaluation inline")
    if config.model.freeze_encoder and not config.train.init_from:
        raise ConfigError("model.freeze_encoder trains only the classifier: set train.init_from to the work "
                          "directory of a trained encoder (e.g. a SimCLR pre-training)")
    runtime = config.runtime
    for conflict, message in (  # devices that cannot go together, in the order a user would fix them
            (runtime.cpu_replicas and runtime.gpus, "runtime.cpu_replicas and runtime.gpus cannot be used together"),
            (runtime.strategy == "one_device" and runtime.cpu_replicas > 1, "runtime.strategy one_device cannot "
             "use runtime.cpu_replicas > 1; use --strategy mirrored (or auto) to train on several CPU replicas"),
            (runtime.strategy == "one_device" and (runtime.gpus or 0) > 1,
             "runtime.strategy one_device cannot use runtime.gpus > 1; use --strategy mirrored (or auto)"),
            (runtime.tpu and (runtime.gpus or (runtime.cpu_replicas or 0) > 1), "runtime.tpu cannot be used with "
             "runtime.gpus or runtime.cpu_replicas: a TPU run trains on the TPU's cores"),
            (runtime.tpu and runtime.strategy not in ("auto", "tpu"),
             f"runtime.tpu is set but runtime.strategy is {runtime.strategy}: use tpu (or auto)"),
            (runtime.strategy == "tpu" and not runtime.tpu,
             "runtime.strategy tpu needs runtime.tpu (a TPU name, address or 'local')")):
        if conflict:
            raise ConfigError(message)
    replicas = config.runtime.cpu_replicas or config.runtime.gpus or 1
    check_batch_divisible(config, replicas)


def _inside_runs(name: str) -> bool:
    """Whether runs/NAME is a directory below runs/: not runs/ itself, nor above or beside it."""
    parts = name.replace("\\", "/").split("/")
    return bool(name.strip()) and not name.startswith("/") and ".." not in parts and set(parts) != {"."}


def _mode_checks(config: Config) -> list[tuple[bool, str, str]]:
    """(holds, key, what it must be) for the distillation and SimCLR keys."""
    distill, simclr = config.distill, config.simclr
    return [
        (0 <= distill.alpha <= 1, "distill.alpha", "in [0, 1]"),
        (distill.temperature > 0, "distill.temperature", "> 0"),
        (simclr.temperature > 0, "simclr.temperature", "> 0"),
        (simclr.projection_dim >= 1, "simclr.projection_dim", ">= 1"),
        (simclr.projection_hidden >= 0, "simclr.projection_hidden", ">= 0"),
        (0 < simclr.crop_scale_min <= 1, "simclr.crop_scale_min", "in (0, 1]"),
        (0 <= simclr.color_jitter_probability <= 1, "simclr.color_jitter_probability", "in [0, 1]"),
        (0 <= simclr.grayscale_probability <= 1, "simclr.grayscale_probability", "in [0, 1]"),
        (simclr.brightness >= 0, "simclr.brightness", ">= 0"),
        (simclr.contrast >= 0, "simclr.contrast", ">= 0"),
        (simclr.saturation >= 0, "simclr.saturation", ">= 0"),
        (0 <= simclr.hue <= 0.5, "simclr.hue", "in [0, 0.5]"),
        (simclr.knn_k >= 1, "simclr.knn_k", ">= 1"),
        (simclr.knn_temperature > 0, "simclr.knn_temperature", "> 0"),
    ]


def _validate_source(data: DataConfig) -> None:
    """The keys of data.source are set, and the keys of the other sources are not."""
    generated = data.generated
    if data.source == "generated":
        if generated.train_examples < 1 or generated.test_examples < 1:
            raise ConfigError("data.source generated needs data.generated.train_examples and "
                              "data.generated.test_examples > 0")
        if data.dataset != "cifar10":
            raise ConfigError("data.source generated writes CIFAR-10's format: data.dataset must be cifar10")
    elif generated.train_examples or generated.test_examples:
        raise ConfigError(f"data.generated is read only with data.source generated (data.source is {data.source})")
    if data.source == "image_folder" and not data.image_folder:
        raise ConfigError("data.source image_folder needs data.image_folder (a folder with train/<class>/* and "
                          "test/<class>/*)")
    if data.source != "image_folder" and data.image_folder:
        raise ConfigError(f"data.image_folder is read only with data.source image_folder (data.source is "
                          f"{data.source})")


def check_batch_divisible(config: Config, num_replicas: int) -> None:
    """The global batch is split evenly over replicas (and micro-batches), or the job is refused."""
    batch = config.train.global_batch_size
    if batch % num_replicas:
        raise ConfigError(
            f"train.global_batch_size {batch} is not divisible by the {num_replicas} replicas; "
            f"use a multiple of {num_replicas}, e.g. {max(num_replicas, batch // num_replicas * num_replicas)}"
        )
    accumulation = config.train.grad_accum_steps
    if (batch // num_replicas) % accumulation:
        raise ConfigError(
            f"train.grad_accum_steps {accumulation} does not divide the per-replica batch "
            f"{batch // num_replicas} (train.global_batch_size {batch} over {num_replicas} replicas)"
        )


def _value_of(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def build_config(
    job_file: str | None = None,
    overrides: list[str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Layers defaults, the job file, `--set` overrides and dedicated flags; validates."""
    config = Config()
    if job_file:
        config = merge(config, load_yaml_file(job_file, "--job file"), f"job file {job_file!r}")
    if overrides:
        parsed = [parse_override(text) for text in overrides]
        config = merge(config, nest_overrides(parsed), "--set")
    if flags:
        config = merge(config, nest_overrides(list(flags.items())), "command line")
    config = upgrade(config, job_file or "the command line")
    validate(config)
    return config


def from_yaml_text(text: str, source: str) -> Config:
    """The config a YAML text (e.g. a work directory's config.yaml) describes; validated."""
    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{source} must hold a mapping of sections (runtime, data, model, train), not "
                          f"{type(content).__name__}")
    config = merge(Config(), content, source)
    config = upgrade(config, source)
    try:
        validate(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


def upgrade(config: Config, source: str) -> Config:
    """Reads configs written before data.source and the distillation task as they were meant, with a warning."""
    data, train = config.data, config.train
    implied = "image_folder" if data.image_folder else "generated" if data.generated.train_examples else None
    notes = []
    if implied and data.source == "tfds":
        notes.append(f"data.source is {implied} where data.{implied} is set; set data.source: {implied}")
        config = dataclasses.replace(config, data=dataclasses.replace(data, source=implied))
    if config.distill.teacher_workdir and train.task == "classification":
        notes.append("distillation is train.task: distillation now (distill.teacher_workdir is set); set it")
        config = dataclasses.replace(config, train=dataclasses.replace(train, task="distillation"))
    for note in notes:
        print(f"warning: {source}: {note}", file=sys.stderr, flush=True)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain data, as written to WORKDIR/config.yaml."""
    return dataclasses.asdict(config)


def dump(config: Config) -> str:
    """The config as YAML that `--job` reads back to the same config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
