"""A sweep's search space: SPACE.yaml maps config keys to distributions, all checked before any trial starts.

    train.learning_rate:  {type: float, low: 0.05, high: 0.8, log: true}
    train.warmup_epochs:  {type: int, low: 0, high: 3}          # optional: step
    data.cutmix_prob:     {type: categorical, choices: [0.0, 0.5, 1.0]}

Every key must be a config key the job's task reads (config.py; a section such as
`simclr` counts only for a task that reads it), and every value a trial may draw (every
choice, every value of an integer range, both ends of a float range) must give a config
that `--dry_run` would accept: the same checks, the same one-line errors naming the key
and the file (exit 2). Values of two keys that only fail together (a batch size and an
accumulation) are caught as they are drawn: that trial fails without running.

    python -m launcher.sweep --job jobs/cpu_smoke.yaml --space jobs/sweep_cpu_smoke.yaml --dry_run ...
"""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal
from typing import Any

import yaml

from resnet18 import config as config_lib
from resnet18 import tasks
from resnet18.config import Config
from resnet18.identity import ALWAYS_READ
from resnet18.runtime.errors import ConfigError

KINDS = ("float", "int", "categorical")
INT_VALUES_CHECKED = 4096  # an integer range up to this long has every value checked, a longer one its ends


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One key of the space and how a trial draws it."""

    key: str
    kind: str  # float, int or categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def values_to_check(self) -> tuple[Any, ...]:
        """The values that have to be valid for every draw to be: every choice, every value of an integer
        range (a batch size or accumulation divides or not value by value; the ends of a long one), the
        ends of a float range (as the floats it draws, even when written as integers)."""
        if self.kind == "categorical":
            return self.choices
        if self.kind == "float":
            return float(self.low), float(self.high)
        values = range(self.low, self.high + 1, self.step or 1)
        return tuple(values) if len(values) <= INT_VALUES_CHECKED else (self.low, self.high)


def load_space(path: str, job: Config) -> list[Dimension]:
    """The dimensions of SPACE.yaml, each checked against `job` (see the module docstring).

    Raises:
      ConfigError: a bad file, key, distribution or value, naming it (exit 2).
    """
    source = f"sweep space {path!r}"
    raw = config_lib.load_yaml_file(path, "--space file")
    if not raw:
        raise ConfigError(f"{source} names no key to search")
    dimensions = [_dimension(key, spec, source) for key, spec in raw.items()]
    for dimension in dimensions:
        _check_read_by_task(dimension.key, job, source)
        for value in dimension.values_to_check():
            with_value(job, {dimension.key: value}, f"{source}: {dimension.key}")
    return dimensions


def _dimension(key: Any, spec: Any, source: str) -> Dimension:
    where = f"{source}: {key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping such as {{type: float, low: 0.01, high: 1.0}}")
    allowed = {"type", "low", "high", "log", "step", "choices"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise ConfigError(f"{where}: type must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
        if any(field in spec for field in ("low", "high", "log", "step")):
            raise ConfigError(f"{where}: categorical takes choices only, not low/high/log/step")
        return Dimension(str(key), kind, choices=tuple(choices))
    number = int if kind == "int" else (int, float)
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high)):
        if not isinstance(value, number) or isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        if not math.isfinite(value):  # Optuna's draw overflowed, with the trial left running
            raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
    if low > high:
        raise ConfigError(f"{where}: low {low} > high {high}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None and (not isinstance(step, number) or isinstance(step, bool) or not 0 < step < math.inf
                             or log):
        raise ConfigError(f"{where}: step must be a positive {kind} (and not with log), got {step!r}")
    span = Decimal(str(high)) - Decimal(str(low))  # in decimal, as Optuna steps: 0.3 - 0.1 is 0.2, not 0.19999...
    if step is not None and span > 0 and Decimal(str(step)) > span:  # Optuna would draw low every time
        raise ConfigError(f"{where}: step {step} is more than high - low ({span}): every trial would draw {low}")
    if step is not None and kind == "int" and (high - low) % step:  # Optuna would quietly lower high
        raise ConfigError(f"{where}: high {high} is not low {low} + a multiple of step {step}")
    return Dimension(str(key), kind, low, high, log, step)


def _check_read_by_task(key: str, job: Config, source: str) -> None:
    section = key.split(".")[0]
    task = tasks.task_of(job)
    if section not in ALWAYS_READ and section not in task.sections:
        raise ConfigError(f"{source}: {key}: the job's task ({task.name}) does not read {section}.*, so every trial "
                          "would train the same")


def with_value(job: Config, params: dict[str, Any], source: str) -> Config:
    """The job's config with `params` set, checked as a run checks it (ConfigError naming the key)."""
    config = config_lib.merge(job, config_lib.nest_overrides(list(params.items())), source)
    config_lib.validate(config)
    return tasks.check(config)


def suggest(trial, dimensions: list[Dimension]) -> dict[str, Any]:
    """The values an Optuna trial draws for `dimensions`."""
    params = {}
    for dimension in dimensions:
        if dimension.kind == "categorical":
            params[dimension.key] = trial.suggest_categorical(dimension.key, list(dimension.choices))
        elif dimension.kind == "int":
            params[dimension.key] = trial.suggest_int(dimension.key, dimension.low, dimension.high,
                                                      step=dimension.step or 1, log=dimension.log)
        else:
            params[dimension.key] = trial.suggest_float(dimension.key, dimension.low, dimension.high,
                                                        step=dimension.step, log=dimension.log)
    return params


def overrides(params: dict[str, Any]) -> list[str]:
    """`--set` arguments that give a run these values (YAML, as --set reads them)."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in params.items()]
