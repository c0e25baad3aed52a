"""A local worker group in a private network: nothing outside reaches its servers, and it trains the same.

    python -m pytest tests/test_isolation.py
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import TINY_JOB, run_launcher
from tests.processes import Running, processes_naming

FINGERPRINT = re.compile(r"\[worker 0\] Final weights sha256 ([0-9a-f]{64})")


def reachable(port: int) -> bool:
    """Whether something on this (the host's) network accepts a connection on 127.0.0.1:PORT."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except OSError:
        return False


def run_and_probe(tiny_data_dir: str, workdir, network: str) -> tuple[str, dict[int, bool], str]:
    """(the run's output, whether each worker's port was reachable from here while it trained, its fingerprint)."""
    run = Running(["--workers", "2", "--worker_network", network, "--job", TINY_JOB, "--workdir", str(workdir),
                   "--set", f"data.data_dir={tiny_data_dir}", "train.deterministic=true", "train.epochs=2"])
    try:
        run.wait_for(r"^\[worker 0\] Epoch 1/2")  # both servers are up: the group has formed
        ports = [int(port) for port in re.findall(r"Started worker \d \(pid \d+, rank \d, port (\d+)", run.output)]
        probed = {port: reachable(port) for port in ports}
        assert run.finish() == 0, run.output[-3000:]
    finally:
        run.process.kill()
    return run.output, probed, FINGERPRINT.search(run.output).group(1)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("unshare") is None,
                    reason="network namespaces are Linux's, made with util-linux's unshare")
def test_a_private_group_refuses_connections_from_outside_and_trains_what_a_host_group_trains(tiny_data_dir, tmp_path):
    private_output, private, private_weights = run_and_probe(tiny_data_dir, tmp_path / "private", "private")
    assert "worker network: private" in private_output
    host_output, host, host_weights = run_and_probe(tiny_data_dir, tmp_path / "host", "host")
    assert "worker network: host" in host_output
    assert len(private) == len(host) == 2
    assert not any(private.values()), private  # refused: nothing listens on the host's network
    assert all(host.values()), host  # the same servers on the host's network accept anyone
    assert private_weights == host_weights


def test_the_dry_run_says_where_the_workers_network_is():
    result = run_launcher("--job", TINY_JOB, "--workers", "2", "--worker_network", "host", "--dry_run", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "worker network: host (--worker_network host; TensorFlow's servers listen on every interface)" \
        in result.stdout


def test_a_private_network_that_cannot_be_made_is_refused_saying_why(tmp_path):
    # A data set read from a bucket during training (a gs:// --workdir is refused with --workers: test_flags.py).
    remote = ("--set", "data.data_dir=gs://bucket/tfds")
    result = run_launcher("--job", TINY_JOB, "--workers", "2", "--worker_network", "private", *remote,
                          "--dry_run", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--worker_network private: data.data_dir gs://bucket/tfds needs the network during training" \
        in result.stderr
    assert "Traceback" not in result.stderr
    auto = run_launcher("--job", TINY_JOB, "--workers", "2", *remote, "--dry_run", timeout=60)
    assert auto.returncode == 0 and "worker network: host (no private network: data.data_dir gs://" in auto.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("su") is None,
                    reason="needs root to try the unprivileged path as another user")
def test_without_root_the_namespace_is_made_in_an_unprivileged_user_namespace(monkeypatch):
    from launcher import isolation

    real_run = subprocess.run

    def as_nobody(command, **options):  # the probe's real commands, run by an unprivileged user
        return real_run(["su", "nobody", "-s", "/bin/sh", "-c", " ".join(command)], **options)

    if as_nobody(["unshare", "--net", "--map-root-user", "true"], capture_output=True).returncode:
        pytest.skip("this kernel does not let an unprivileged user make a user namespace")
    monkeypatch.setattr(isolation.subprocess, "run", as_nobody)
    assert isolation.namespace_command() == ("unshare", "--net", "--map-root-user")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("unshare") is None,
                    reason="network namespaces are Linux's, made with util-linux's unshare")
def test_a_sigterm_while_the_data_is_prepared_outside_the_private_network_is_a_preemption(tmp_path):
    # A TFDS data set is prepared (maybe downloaded) by a child process before the group enters its private
    # network. A SIGTERM then took its default action: the launcher died with 143 and left the child running.
    workdir, job = tmp_path / "run", tmp_path / "tfds_job.yaml"
    job.write_text(f"name: tfds_job\ndata:\n  source: tfds\n  dataset: cifar10\n  data_dir: {tmp_path / 'tfds'}\n"
                   "model:\n  width: 4\n")
    run = Running(["--workers", "2", "--worker_network", "private", "--job", str(job), "--workdir", str(workdir)])
    run.wait_for(r"^worker network: private")  # next: python -m launcher.prepare, which imports TensorFlow
    deadline = time.monotonic() + 30
    while not (preparing := processes_naming("launcher.prepare", str(workdir))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert preparing, run.output[-3000:]
    run.process.send_signal(signal.SIGTERM)
    run.process.wait(timeout=60)
    left = processes_naming("launcher.prepare", str(workdir))  # at once: alone, it ends when its download fails
    assert run.finish() == 138, run.output[-3000:]
    assert left == [], f"launcher.prepare outlived the launcher: pids {left}"
    assert "preempted" in run.output and "Traceback" not in run.output, run.output[-3000:]
    assert list(workdir.glob("prepare_*.yaml")) == []
