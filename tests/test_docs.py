"""The front door and the manuals: links that lead somewhere, a README that stays a front door."""

from __future__ import annotations

import pathlib
import re

import pytest

from tests.conftest import REPO

PAGES = [pathlib.Path(REPO, "README.md"), *sorted(pathlib.Path(REPO, "docs").glob("*.md")),
         pathlib.Path(REPO, "benchmarks", "RESULTS.md"), pathlib.Path(REPO, "docker", "README.md")]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO)) for page in PAGES])
def test_every_relative_link_leads_to_a_file_or_folder_of_the_repository(page):
    broken = [target for target, _ in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_ci_runs_the_readmes_test_command():
    readme = pathlib.Path(REPO, "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    assert command in pathlib.Path(REPO, ".ci", "run").read_text().splitlines()


def test_the_readme_is_a_front_door():
    text = pathlib.Path(REPO, "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "python -m launcher --job jobs/cpu_smoke.yaml" in text and "python -m pytest" in text
    for page in sorted(pathlib.Path(REPO, "docs").glob("*.md")):  # every manual is reachable from it
        assert f"docs/{page.name}" in text, page.name
