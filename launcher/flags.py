"""Command-line flags checked the way config keys are.

Every command of the launcher parses its flags with `FlagParser`: a bad value (a negative count, a
grace that is not a positive number, a malformed list) or a missing flag raises `FlagError`, which
the command prints as one `error: ...` line naming the flag and exits 2, before anything starts and
before TensorFlow is imported. Flags that cannot go together are refused by each command's own
checks with the same error, in the code its dry run shares. tests/test_flags.py holds one bad value
per flag: that table is the documentation of what is refused.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, NoReturn

from resnet18.runtime.errors import ConfigError
from resnet18.runtime.files import file_in_the_way


class FlagError(ConfigError):
    """A flag's value, or a combination of flags, that cannot work (exit 2)."""


class FlagParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises FlagError (one line, exit 2) instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise FlagError(f"{message.replace('argument ', '', 1)} (see {self.prog} --help)")


def integer(least: int) -> Callable[[str], int]:
    """A flag's type: an integer >= least."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """A flag's type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def nonempty(text: str) -> str:
    """A flag's type: text with something in it (an empty --workdir or --tpu means a mistake, not a default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def work_directory(text: str) -> str:
    """A flag's type: a directory to write into, or to make; refused when it, or a directory above it, is a
    file (remote paths, gs://..., are checked when written)."""
    if problem := file_in_the_way(nonempty(text)):
        raise argparse.ArgumentTypeError(problem)
    return text


def run_directory(text: str) -> str:
    """A flag's type: an existing local directory, or a remote one (gs://...) that is checked when read."""
    if "://" not in text and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def refuse_together(flags: dict[str, bool], reason: str) -> None:
    """Raises FlagError naming the flags given (True) out of `flags` when more than one is."""
    given = [flag for flag, used in flags.items() if used]
    if len(given) > 1:
        raise FlagError(f"{' and '.join(given)} cannot go together: {reason}")
