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
MAX_MODULE_LINES = 521  # the largest module before the seams (resnet18/train.py); none may grow past it


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


def test_no_module_is_longer_than_the_largest_before_the_seams():
    long = [f"{path.relative_to(REPO)} ({length} lines)" for package in PACKAGES for path in modules(package)
            if (length := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, "\n".join(long)


def test_lint_is_clean():
    """pyflakes, pycodestyle and bugbear rules as pyproject.toml selects them (ruff)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


# Inside resnet18/: sub-packages in layers; each may import only the ones before it (and itself).
LAYERS = ["resnet18.runtime", "resnet18.autograph", "resnet18.identity", "resnet18.config", "resnet18.registry",
          "resnet18.data", "resnet18.models", "resnet18.tasks", "resnet18.training"]
MAY_IMPORT_INSIDE = {
    "resnet18.runtime": set(),
    "resnet18.autograph": set(),
    "resnet18.identity": set(),
    "resnet18.config": {"resnet18.runtime", "resnet18.identity"},
    "resnet18.registry": {"resnet18.runtime"},
    "resnet18.data": {"resnet18.runtime", "resnet18.autograph", "resnet18.config", "resnet18.registry"},
    "resnet18.models": {"resnet18.runtime", "resnet18.config", "resnet18.registry"},
    "resnet18.tasks": {"resnet18.runtime", "resnet18.autograph", "resnet18.identity", "resnet18.config",
                       "resnet18.registry", "resnet18.data", "resnet18.models"},
    "resnet18.training": set(LAYERS[:-1]),
}


def layer_of(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def test_resnet18_sub_packages_import_only_the_layers_below_them():
    wrong = []
    for path in modules("resnet18"):
        own = layer_of(module_name(path))
        for module, names in imported(path):
            targets = [module] + [f"{module}.{name}" for name in names]
            for target in targets:
                layer = layer_of(target)
                if layer and layer != own and own and layer not in MAY_IMPORT_INSIDE[own]:
                    wrong.append(f"{path.relative_to(REPO)} ({own}) imports {target}")
                    break
    assert not wrong, "\n".join(wrong)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (lazy imports too; `from P import m` counts P.m when m is one)."""
    ours = {module_name(path): path for package in PACKAGES for path in modules(package)}
    graph: dict[str, set[str]] = {}
    for name, path in ours.items():
        edges = set()
        for module, names in imported(path):
            submodules = {f"{module}.{item}" for item in names} & set(ours)
            edges |= (submodules or ({module} & set(ours))) - {name}
        graph[name] = edges
    return graph


def test_no_import_cycle_anywhere():
    graph = import_graph()
    cycles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        if node in path:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        if node in done:
            return
        for neighbour in sorted(graph.get(node, ())):
            visit(neighbour, path + [node], done)
        done.add(node)

    finished: set[str] = set()
    for start in sorted(graph):
        visit(start, [], finished)
    # A package's __init__ that lists its modules (a registry) is imported by them only as a package path.
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_no_task_is_named_outside_its_own_module_and_the_registry():
    """The loop, the checkpointer, the evaluator, the launcher know tasks only through the Task seam."""
    import re

    named = re.compile(r"""["'](classification|distillation|simclr)["']""")
    allowed = {pathlib.Path(REPO, "resnet18", "config.py")}  # the Literal listing train.task's values
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for package in ("resnet18", "launcher") for path in modules(package)
             if "tasks" not in path.relative_to(REPO).parts and path not in allowed
             for number, line in enumerate(path.read_text().splitlines(), start=1) if named.search(line)]
    assert not found, "\n".join(found)
