"""One test per core (pytest-xdist: `python -m pytest -n auto`, what CI runs), with shared fixtures once.

Serial, the suite keeps 2 cores about half busy (importing TensorFlow and tracing use one; the fault
tests wait on stopped processes). Tests that share a costly fixture (a module's reference run, the
smoke job, a Slurm cluster) go to one worker, which computes it once. The doubled load found two races
(an evaluator giving up on a compiling chief, a Slurm job read while COMPLETING), both fixed before CI
switched, after three clean parallel runs.

tests/conftest.py takes these hooks in; they import nothing heavy, so tests/test_parallel.py can run them
on a suite of its own.
"""

from __future__ import annotations

import os

import pytest

SHARED_SESSION_FIXTURES = frozenset({"smoke_run"})  # session fixtures worth computing once, not per worker
MOST_WORKERS = 4  # each test may run a few TensorFlow processes of its own


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown without it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(len(os.sched_getaffinity(0)), MOST_WORKERS))


@pytest.hookimpl(tryfirst=True)  # before xdist's, which would pick --dist load
def pytest_cmdline_main(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and config.option.dist == "no":
        config.option.dist = "loadgroup"  # -n alone honours the groups below


# A worker parses the command line afresh (`-n auto`, no --dist), so it would not write the groups into its
# tests' ids, which is all the controller's scheduler sees of them: the controller tells it.
@pytest.hookimpl(optionalhook=True)  # xdist's hook
def pytest_configure_node(node) -> None:
    node.workerinput["loadgroup"] = node.config.option.dist == "loadgroup"


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config, "workerinput", {}).get("loadgroup"):
        config.option.loadgroup = True


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which writes each test's group into its id
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Puts the tests that share a costly fixture into one xdist group (a union of overlapping sets)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared_by_item = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = []
        for name, definitions in (info.name2fixturedefs.items() if info else ()):
            scope = definitions[-1].scope
            if scope in ("module", "class", "package"):
                shared.append(f"{item.module.__name__}::{name}")
            elif scope == "session" and name in SHARED_SESSION_FIXTURES:
                shared.append(name)
        for key in shared[1:]:
            parent[root(key)] = root(shared[0])
        shared_by_item[item] = shared
    for item, shared in shared_by_item.items():
        if shared:
            item.add_marker(pytest.mark.xdist_group(root(shared[0])))
