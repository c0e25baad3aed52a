"""The time-to-accuracy benchmark runs a tiny job twice and its JSON agrees with itself.

Whether a target is reached is the benchmark's to measure (benchmarks/time_to_accuracy.py),
not asserted here: the epoch reaching it is recomputed from the recorded accuracies.
"""

from __future__ import annotations

import json
import subprocess
import sys

from launcher.cluster import environment_without_cluster
import pytest

from benchmarks.time_to_accuracy import aggregate, first_epoch_reaching
from tests.conftest import REPO, TINY_JOB

TARGET = 0.15


def run_benchmark(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = environment_without_cluster()
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run([sys.executable, "-m", "benchmarks.time_to_accuracy", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_tiny_runs_record_accuracy_per_epoch_and_consistent_aggregates(tiny_data_dir, tmp_path):
    output = tmp_path / "tta.json"
    result = run_benchmark("--job", TINY_JOB, "--runs", "2", "--target", str(TARGET), "--workdir_root",
                           str(tmp_path / "runs"), "--json", str(output), "--set", f"data.data_dir={tiny_data_dir}",
                           "train.epochs=2", "model.width=4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(output.read_text())

    runs = results["runs"]
    assert [run["run"] for run in runs] == [1, 2]
    for run in runs:
        assert [entry["epoch"] for entry in run["epochs"]] == [1, 2]
        seconds = [entry["train_seconds"] for entry in run["epochs"]]
        assert seconds[0] > 0 and seconds == sorted(seconds), seconds
        assert all(0 <= entry["test_accuracy"] <= 1 for entry in run["epochs"])
        reached = next((entry for entry in run["epochs"] if entry["test_accuracy"] >= TARGET), None)
        assert run["target_epoch"] == (reached and reached["epoch"])
        assert run["target_train_seconds"] == (reached and reached["train_seconds"])
        assert run["target_elapsed_seconds"] == (reached and reached["elapsed_seconds"])
        assert run["final_train_seconds"] == seconds[-1]
        # The whole subprocess includes start-up and evaluation, so it outlasts the training calls.
        assert run["wall_seconds"] > run["final_train_seconds"]
        assert run["workdir"] == str(tmp_path / "runs" / f"run_{run['run']}")
        assert f"data.data_dir={tiny_data_dir}" in run["command"]

    finals = [run["final_test_accuracy"] for run in runs]
    reached_runs = [run for run in runs if run["target_epoch"] is not None]
    summary = results["aggregate"]
    assert summary["runs"] == 2
    assert summary["final_test_accuracy_mean"] == pytest.approx(sum(finals) / 2)
    assert (summary["final_test_accuracy_min"], summary["final_test_accuracy_max"]) == (min(finals), max(finals))
    assert summary["runs_reaching_target"] == len(reached_runs)
    if reached_runs:
        mean = sum(run["target_train_seconds"] for run in reached_runs) / len(reached_runs)
        assert summary["mean_train_seconds_to_target"] == pytest.approx(mean)
    else:
        assert summary["mean_train_seconds_to_target"] is None

    environment = results["environment"]
    assert environment["devices"] and environment["precision"] and environment["tensorflow_version"]
    assert environment["date_utc"].endswith("+00:00") and environment["hostname"]
    assert len(environment["launcher_commands"]) == 2 and "--runs 2" in environment["command"]
    assert "final acc" in result.stdout and "test accuracy after each epoch" in result.stdout


def test_target_and_aggregates_on_a_recorded_history():
    """The branch the tiny runs may not reach: a target met in some runs and not others."""
    epochs = [{"epoch": 1, "test_accuracy": 0.5, "train_seconds": 10.0, "elapsed_seconds": 12.0},
              {"epoch": 2, "test_accuracy": 0.95, "train_seconds": 20.0, "elapsed_seconds": 25.0},
              {"epoch": 3, "test_accuracy": 0.96, "train_seconds": 30.0, "elapsed_seconds": 37.0}]
    assert first_epoch_reaching(epochs, 0.94)["epoch"] == 2
    assert first_epoch_reaching(epochs, 0.95)["epoch"] == 2  # reaching means at or above
    assert first_epoch_reaching(epochs, 0.97) is None
    keys = ("final_test_accuracy", "target_epoch", "target_train_seconds", "target_elapsed_seconds")
    runs = [dict(zip(keys, values)) for values in [(0.96, 2, 20.0, 25.0), (0.93, None, None, None),
                                                   (0.95, 3, 40.0, 50.0)]]
    summary = aggregate(runs)
    assert summary["runs_reaching_target"] == 2
    assert summary["mean_train_seconds_to_target"] == pytest.approx(30.0)  # over the runs that reached it
    assert summary["mean_elapsed_seconds_to_target"] == pytest.approx(37.5)
    assert summary["final_test_accuracy_mean"] == pytest.approx(0.94666666)
    assert (summary["final_test_accuracy_min"], summary["final_test_accuracy_max"]) == (0.93, 0.96)


@pytest.mark.parametrize("args, message", [
    (["--job", TINY_JOB, "--runs", "0"], "--runs must be >= 1, got 0"),
    (["--job", "jobs/no_such_job.yaml"], "job file 'jobs/no_such_job.yaml' does not exist"),
])
def test_bad_arguments_exit_2_naming_the_problem(args, message, tmp_path):
    result = run_benchmark(*args, "--workdir_root", str(tmp_path / "runs"), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_failed_run_exits_with_its_code_and_says_which(tmp_path):
    # No machine has 64 GPUs (64 divides the batch, so the config is valid): the launcher exits 2
    # (environment error) right after start-up.
    result = run_benchmark("--job", TINY_JOB, "--gpus", "64", "--workdir_root", str(tmp_path / "runs"), timeout=300)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run 1 of 1 failed with exit code 2" in result.stderr
    assert "asked for 64 GPU(s)" in result.stderr.split("last ")[-1]  # the child's last lines are repeated
    assert not (tmp_path / "runs" / "time_to_accuracy.json").exists()
