"""Every flag of every command, refused when it cannot work: one bad value per flag, and the flag
combinations that cannot work, each exiting 2 with one `error:` line that names the flag, before
anything starts (no work directory made, TensorFlow not imported) and, for the launcher, in the dry
run too. This table is the documentation of what is refused (docs/running.md points here)."""
import concurrent.futures
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from processes import environment_without_cluster

SMOKE = os.path.join(REPO, "jobs", "cpu_smoke.yaml")
SPACE = os.path.join(REPO, "jobs", "sweep_cpu_smoke.yaml")
A_FILE = os.path.join(REPO, "setup.cfg")  # a --workdir that is a file, or under one
WORKERS = ["--job", SMOKE, "--workers", "2"]
SWEEP = ["--job", SMOKE, "--space", SPACE, "--trials", "2"]

# (command, arguments, what the one-line error names). WORKDIR is replaced by a path that must stay absent.
BAD_FLAGS = [
    ("launcher", ["--job", "/no/such/job.yaml"], "--job file '/no/such/job.yaml'"),
    ("launcher", ["--job", ""], "--job: must not be empty"),
    ("launcher", ["--job", SMOKE, "--workdir", ""], "--workdir: must not be empty"),
    # Each was a FileExistsError or NotADirectoryError traceback once training started, and passed the dry run.
    ("launcher", ["--job", SMOKE, "--workdir", A_FILE], f"--workdir: {A_FILE!r} is a file, not a directory"),
    ("launcher", [*WORKERS, "--workdir", A_FILE + "/run"], f"--workdir: {A_FILE + '/run'!r} lies under the file "
     f"{A_FILE!r}"),
    ("launcher", ["--job", SMOKE, "--strategy", "horovod"], "--strategy: invalid choice"),
    ("launcher", ["--job", SMOKE, "--gpus", "-1"], "--gpus: must be >= 0"),
    ("launcher", ["--job", SMOKE, "--gpus", "two"], "--gpus: expected an integer"),
    ("launcher", ["--job", SMOKE, "--cpu_replicas", "0"], "--cpu_replicas: must be >= 1"),
    ("launcher", ["--job", SMOKE, "--tpu", " "], "--tpu: must not be empty"),
    ("launcher", ["--job", SMOKE, "--set", "train.epochs"], "--set 'train.epochs': expected key.path=value"),
    ("launcher", ["--job", SMOKE, "--set", "train.epoch=3"], "--set: unknown key 'train.epoch'"),
    ("launcher", ["--job", SMOKE, "--set", "train.epochs=-1"], "train.epochs must be >= 1"),
    ("launcher", ["--job", SMOKE, "--workers", "0"], "--workers: must be >= 1"),
    ("launcher", [*WORKERS, "--gpus_per_worker", "-1"], "--gpus_per_worker: must be >= 0"),
    # Asking for GPUs that are not there is an error, as `--gpus 4` is.
    ("launcher", [*WORKERS, "--gpus_per_worker", "1"], "--gpus_per_worker 1 needs 2 GPUs; this host shows 0"),
    ("launcher", [*WORKERS, "--max_restarts", "-1"], "--max_restarts: must be >= 0"),
    ("launcher", [*WORKERS, "--min_workers", "0"], "--min_workers: must be >= 1"),
    ("launcher", [*WORKERS, "--min_workers", "3"], "--min_workers must be between 1 and --workers 2"),
    # A slot is dropped after SHRINK_AFTER (2) failed starts in a row: with fewer restarts, never.
    ("launcher", [*WORKERS, "--min_workers", "1", "--max_restarts", "1"],
     "--min_workers drops a worker after 2 failed starts in a row: it needs --max_restarts 2 or more, got 1"),
    ("launcher", [*WORKERS, "--preemption_grace", "-1"], "--preemption_grace: must be a number of seconds > 0"),
    ("launcher", [*WORKERS, "--preemption_grace", "nan"], "--preemption_grace: must be a number of seconds > 0"),
    ("launcher", [*WORKERS, "--frozen_after", "0"], "--frozen_after: must be a number of seconds > 0"),
    ("launcher", [*WORKERS, "--frozen_after", "5"], "--frozen_after must be more than 10 seconds"),
    ("launcher", ["--job", SMOKE, "--frozen_after", "30"], "--frozen_after go(es) with --workers N"),
    ("launcher", [*WORKERS, "--log_workers", "5"], "--log_workers names worker 5; --workers 2 has workers 0 to 1"),
    ("launcher", [*WORKERS, "--log_workers", "0,chief"], "--log_workers: expected all, or worker ranks"),
    ("launcher", [*WORKERS, "--log_workers", "evaluator"], "--log_workers names the evaluator"),
    ("launcher", [*WORKERS, "--worker_network", "vpn"], "--worker_network: invalid choice"),
    # Its logs, liveness files and job file would have gone to a local directory named ./gs:/bucket/run.
    ("launcher", [*WORKERS, "--workdir", "gs://bucket/run"], "--workdir gs://bucket/run: --workers keeps"),
    # Flags that cannot go together.
    ("launcher", ["--job", SMOKE, "--evaluator"], "--evaluator go(es) with --workers N"),
    ("launcher", ["--job", SMOKE, "--max_restarts", "2", "--preemption_grace", "5"],
     "--max_restarts, --preemption_grace go(es) with --workers N"),
    ("launcher", [*WORKERS, "--strategy", "mirrored"], "--strategy cannot go with --workers 2"),
    ("launcher", [*WORKERS, "--gpus", "2"], "--gpus cannot go with --workers 2"),
    ("launcher", [*WORKERS, "--tpu", "local"], "--tpu cannot go with --workers 2"),
    ("launcher", ["--job", SMOKE, "--cpu_replicas", "2", "--gpus", "1"], "runtime.cpu_replicas is --cpu_replicas"),
    ("launcher", ["--job", SMOKE, "--tpu", "local", "--gpus", "1"], "runtime.gpus is --gpus"),
    ("launcher", ["--job", SMOKE, "--tpu", "local", "--strategy", "mirrored"], "runtime.strategy is --strategy"),
    ("launcher", ["--job", SMOKE, "--strategy", "one_device", "--gpus", "2"], "runtime.gpus is --gpus"),
    ("launcher", ["--job", SMOKE, "--strategy", "tpu"], "runtime.strategy tpu needs runtime.tpu"),
    ("launcher", ["--job", SMOKE, "--unknown_flag"], "unrecognized arguments: --unknown_flag"),
    ("launcher.status", [], "the following arguments are required: --workdir"),
    ("launcher.status", ["--workdir", "/no/such/run"], "--workdir: '/no/such/run' is not a directory"),
    ("launcher.status", ["--workdir", "EMPTY", "--json"], "holds no run (no config.yaml)"),
    ("launcher.export", ["--workdir", "/no/such/run"], "--workdir: '/no/such/run' is not a directory"),
    ("launcher.export", ["--workdir", "EMPTY", "--formats", "saved_model,pickle"], "--formats: unknown ['pickle']"),
    ("launcher.export", ["--workdir", "EMPTY", "--weights", "median"], "--weights: invalid choice"),
    ("launcher.report", ["--workdir", "/no/such/run"], "--workdir: '/no/such/run' is not a directory"),
    ("launcher.prepare", ["--job", ""], "--job: must not be empty"),
    ("launcher.prepare", ["--job", SMOKE, "--workdir", ""], "--workdir: must not be empty"),
    ("launcher.prepare", ["--job", SMOKE, "--workdir", A_FILE], f"--workdir: {A_FILE!r} is a file, not a directory"),
    ("launcher.prepare", ["--job", SMOKE, "--set", "train.epoch=3"], "--set: unknown key 'train.epoch'"),
    ("launcher.sweep", ["--space", SPACE, "--trials", "2", "--workdir", "WORKDIR"],
     "the following arguments are required: --job"),
    ("launcher.sweep", ["--job", SMOKE, "--space", "/no/such/space.yaml", "--trials", "2"],
     "--space file '/no/such/space.yaml' does not exist"),
    ("launcher.sweep", [*SWEEP[:4], "--trials", "0"], "--trials: must be >= 1"),
    ("launcher.sweep", [*SWEEP, "--workdir", ""], "--workdir: must not be empty"),
    ("launcher.sweep", [*SWEEP, "--workdir", A_FILE], f"--workdir: {A_FILE!r} is a file, not a directory"),
    ("launcher.sweep", [*SWEEP, "--set", "train.lr=0.1"], "--set: unknown key 'train.lr'"),
    ("launcher.sweep", [*SWEEP, "--parallel", "0"], "--parallel: must be >= 1"),
    ("launcher.sweep", [*SWEEP, "--storage", ""], "--storage: must not be empty"),
    ("launcher.sweep", [*SWEEP, "--study_name", ""], "--study_name: must not be empty"),
    ("launcher.sweep", [*SWEEP, "--metric", "f1"], "--metric f1: train.task classification evaluates only"),
    ("launcher.sweep", [*SWEEP, "--direction", "up"], "--direction: invalid choice"),
    ("launcher.sweep", [*SWEEP, "--pruner", "asha2"], "--pruner: invalid choice"),
    ("launcher.sweep", [*SWEEP, "--seed", "-1"], "--seed: must be >= 0"),
    ("launcher.sweep", [*SWEEP, "--trial_restarts", "-1"], "--trial_restarts: must be >= 0"),
    ("launcher.sweep", [*SWEEP, "--machine_id", ""], "--machine_id: must not be empty"),
    ("launcher.sweep", [*SWEEP, "--dry_run", "--", "--job", SMOKE], "--job after --: the sweep gives every trial"),
    ("launcher.sweep", [*SWEEP, "--", "--workers", "2", "--log_workers", "5"],
     "after --: --log_workers names worker 5"),
    ("launcher.sweep", [*SWEEP, "--", "--evaluator"], "after --: --evaluator go(es) with --workers N"),
]

# Flags with no value to get wrong, each with why.
SWITCHES = {
    "--help": "argparse's own",
    "--dry_run": "added to every launcher row below: it refuses what the run refuses",
    "--json": "a switch of launcher.status (used in a row above)",
    "--evaluator": "a switch (its combinations are rows above)",
}

# Runs the real command in a fresh process, then says whether TensorFlow was imported on the way.
WRAPPER = """
import runpy, sys
module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exit:
    code = exit.code
print("tensorflow imported" if "tensorflow" in sys.modules else "tensorflow not imported")
sys.exit(code)
"""


def run_command(module: str, args: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, str]:
    """The command with WORKDIR/EMPTY filled in; (completed process, the work directory that must stay absent)."""
    workdir = str(tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [workdir if arg == "WORKDIR" else str(empty) if arg == "EMPTY" else arg for arg in args]
    if module in ("launcher", "launcher.sweep", "launcher.prepare") and "--workdir" not in args:
        at = args.index("--") if "--" in args else len(args)  # the sweep's own flags come before its --
        args = [*args[:at], "--workdir", workdir, *args[at:]]
    env = dict(environment_without_cluster(), CUDA_VISIBLE_DEVICES="")  # no GPUs, whatever the host has
    return subprocess.run([sys.executable, "-c", WRAPPER, module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120), workdir


def rows():
    for module, args, named in BAD_FLAGS:
        yield pytest.param(module, args, named, id=f"{module} {' '.join(args).replace(REPO + '/', '')}")
        if module == "launcher":
            yield pytest.param(module, [*args, "--dry_run"], named,
                               id=f"{module} {' '.join(args).replace(REPO + '/', '')} --dry_run")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every row's command, run 4 at a time (each is a short-lived process): {row id: (result, workdir)}."""
    cases = list(rows())
    # Made here, not in the threads: the first mktemp of an xdist worker makes its base directory, deleting
    # what is there, and four threads doing so at once deleted each other's (FileNotFoundError in every row).
    directories = [tmp_path_factory.mktemp("flag") for _ in cases]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        done = pool.map(lambda case, directory: run_command(case.values[0], case.values[1], directory),
                        cases, directories)
        return {case.id: outcome for case, outcome in zip(cases, done)}


@pytest.mark.parametrize("module, args, named", rows())
def test_a_bad_flag_exits_2_naming_it_before_anything_starts(module, args, named, results, request):
    result, workdir = results[request.node.callspec.id]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(errors) == 1 and errors[0].startswith("error: ") and named in errors[0], result.stderr
    assert result.stdout.splitlines() == ["tensorflow not imported"], result.stdout  # nothing printed, no TF
    assert not os.path.exists(workdir)


def flags_of(module: str) -> set[str]:
    """Every flag `python -m MODULE --help` lists."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env=environment_without_cluster())
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z_]*", result.stdout))


@pytest.mark.parametrize("module", ["launcher", "launcher.status", "launcher.export", "launcher.report",
                                    "launcher.prepare", "launcher.sweep"])
def test_the_table_has_a_bad_value_for_every_flag(module):
    named = {word for row_module, args, words in BAD_FLAGS if row_module == module
             for word in re.findall(r"(?<![\w-])--[a-z][a-z_]*", " ".join(args) + " " + words)}
    tested = {flag for row_module, args, _ in BAD_FLAGS if row_module == module for flag in args
              if flag.startswith("--")}
    missing = flags_of(module) - (named & tested) - set(SWITCHES)
    assert not missing, f"{module}: no bad value in BAD_FLAGS for {sorted(missing)}"
