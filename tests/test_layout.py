"""The shape of the code: imports flow one way, no function outgrows a screen, lint is clean.

    launcher/    command line, cluster, worker processes, strategy factory, export/report/status
        |        may import resnet18/
        v
    resnet18/    the training library: config, model, data, loop and its parts; imports no launcher/
    benchmarks/  measure both (public names only); nothing imports benchmarks/
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from tests.conftest import REPO

PACKAGES = ("launcher", "resnet18", "benchmarks")
MAY_IMPORT = {"resnet18": set(), "launcher": {"resnet18"}, "benchmarks": {"launcher", "resnet18"}}
MAX_FUNCTION_LINES = 85


def modules(package: str) -> list[pathlib.Path]:
    return sorted(pathlib.Path(REPO, package).rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    """resnet18/data/sources.py -> resnet18.data.sources; a package's __init__.py -> the package."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in `path`, at any depth (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def imports_from_other_packages(package: str):
    """(path, module, names) of every import in `package` of another of our packages."""
    for path in modules(package):
        for module, names in imported(path):
            top = module.split(".")[0]
            if top in PACKAGES and top != package:
                yield path.relative_to(REPO), module, names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way_between_packages(package):
    wrong = [f"{path} imports {module}" for path, module, _ in imports_from_other_packages(package)
             if module.split(".")[0] not in MAY_IMPORT[package]]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_names_are_imported_from_another_package(package):
    wrong = [f"{path} imports {[name for name in names if name.startswith('_')]} from {module}"
             for path, module, names in imports_from_other_packages(package)
             if any(name.startswith("_") for name in names)]
    assert not wrong, "\n".join(wrong)


def test_every_module_of_every_package_imports():
    import importlib

    for package in PACKAGES:
        for path in modules(package):
            if path.stem != "__main__":
                importlib.import_module(module_name(path))


def test_no_function_is_longer_than_a_screen():
    long = []
    for package in PACKAGES:
        for path in modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


def test_lint_is_clean():
    """pyflakes, pycodestyle and bugbear rules as pyproject.toml selects them (ruff)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
