"""The suite's own parallel run (tests/xdist_groups.py): `pytest -n 2` computes a shared fixture once.

The tests that share a costly fixture (the smoke job, a module's reference run, a Slurm cluster) must
run on one worker, or each worker computes it again: a smoke job and a Slurm cluster more per CI run,
and two clusters started at once. This runs the hooks on a small suite of their own, with real
pytest-xdist workers.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

SUITE = {
    "conftest.py": """
        import os
        import pytest
        from tests.xdist_groups import *  # the suite's hooks

        def record(what):
            with open(os.environ["RECORD"], "a") as stream:
                stream.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'serial')} {what}\\n")

        @pytest.fixture(scope="session")
        def smoke_run():  # the name of a session fixture worth computing once (SHARED_SESSION_FIXTURES)
            record("smoke_run")
        """,
    "test_a.py": """
        import time
        import pytest
        from conftest import record

        @pytest.fixture(scope="module")
        def reference():
            record("reference")

        @pytest.mark.parametrize("case", range(6))
        def test_uses_the_reference(reference, case):
            record("reference_user")
            time.sleep(0.2)

        @pytest.mark.parametrize("case", range(6))
        def test_alone(case):
            time.sleep(0.2)

        def test_uses_the_smoke_run(smoke_run):
            record("smoke_user")
        """,
    "test_b.py": """
        import pytest
        from conftest import record

        @pytest.mark.parametrize("case", range(3))
        def test_uses_the_smoke_run_too(smoke_run, case):
            record("smoke_user")
        """,
}


def test_tests_sharing_a_fixture_run_on_one_worker_which_computes_it_once(tmp_path):
    for name, text in SUITE.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    record = tmp_path / "record.txt"
    env = dict(os.environ, RECORD=str(record), PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q",
                             "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = [line.split() for line in record.read_text().splitlines()]  # (worker, what) in order
    workers = collections.defaultdict(set)
    for worker, what in events:
        workers[what].add(worker)
    counts = collections.Counter(what for _, what in events)
    assert counts["reference_user"] == 6 and counts["smoke_user"] == 4, counts
    assert counts["reference"] == 1 and counts["smoke_run"] == 1, counts  # each computed once
    assert len(workers["reference_user"] | workers["reference"]) == 1, dict(workers)
    assert len(workers["smoke_user"] | workers["smoke_run"]) == 1, dict(workers)
    assert workers["reference"] <= {"gw0", "gw1"}, dict(workers)  # on an xdist worker, not serially
