"""python -m launcher.sweep: bad input refused before anything starts, a real sweep, kill and resume, a failed
trial, a PostgreSQL server shared by two sweep processes, TensorBoard's HParams tab.

Trials are the tiny job (width 4, 640 generated images) with a few epochs; every server is a real one
started in a temporary directory and stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from launcher.processes import free_ports
from tests.conftest import REPO, TINY_JOB, server_missing
from tests.processes import Running

SPACE = "train.learning_rate: {type: float, low: 0.1, high: 0.8, log: true}\n" \
        "train.label_smoothing: {type: float, low: 0.0, high: 0.2}\n"
FINGERPRINT = re.compile(r"Final weights sha256 ([0-9a-f]{64})")


def write_space(tmp_path, text: str = SPACE) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def sweep_command(data_dir: str, space: str, workdir, sets: tuple[str, ...] = (), flags: tuple[str, ...] = (),
                  trials: int = 4, parallel: int = 2) -> list[str]:
    return ["--job", TINY_JOB, "--space", space, "--trials", str(trials), "--parallel", str(parallel),
            "--workdir", str(workdir), *flags, "--set", f"data.data_dir={data_dir}", "train.deterministic=true", *sets]


def run_sweep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.sweep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def results(workdir) -> dict:
    return json.loads((workdir / "sweep.json").read_text())


# --- Bad input: exit 2 naming it, nothing started ------------------------------------------

@pytest.mark.parametrize("space, extra, words", [
    ("train.learnng_rate: {type: float, low: 0.1, high: 0.8}\n", [], ["unknown key 'train.learnng_rate'",
                                                                     "did you mean 'learning_rate'"]),
    ("data.augmentation: {type: categorical, choices: []}\n", [], ["data.augmentation: categorical needs a "
                                                                   "non-empty list of choices"]),
    ("train.learning_rate: {type: float, low: 0.8, high: 0.1}\n", [], ["train.learning_rate: low 0.8 > high 0.1"]),
    ("train.label_smoothing: {type: float, low: 0.0, high: 1.5}\n", [], ["train.label_smoothing must be in [0, 1)"]),
    # Optuna's draw overflowed (a traceback, exit 1), leaving a trial RUNNING in the study for good.
    ("train.learning_rate: {type: float, low: 0.1, high: .inf}\n", [], ["train.learning_rate: high must be a "
                                                                       "finite number, got inf"]),
    # Optuna only warned, and drew 0 every time (or lowered high to 4).
    ("train.warmup_epochs: {type: int, low: 0, high: 2, step: 3}\n", [], ["train.warmup_epochs: step 3 is more than "
                                                                         "high - low (2): every trial would draw 0"]),
    ("train.warmup_epochs: {type: int, low: 0, high: 5, step: 2}\n", [], ["high 5 is not low 0 + a multiple of "
                                                                         "step 2"]),
    # Both ends divide the batch of 64; 3 does not: every value of an integer range is checked.
    ("train.grad_accum_steps: {type: int, low: 1, high: 4}\n", [], ["train.grad_accum_steps 3 does not divide the "
                                                                   "per-replica batch 64"]),
    # Every draw of a float range is a float, even between integer ends: an integer key refuses them all.
    ("train.epochs: {type: float, low: 1, high: 3}\n", [], ["train.epochs must be int, got float 1.0"]),
    ("simclr.temperature: {type: float, low: 0.1, high: 0.5}\n", [], ["simclr.temperature: the job's task "
                                                                      "(classification) does not read simclr.*"]),
    (SPACE, ["--metric", "test_loss", "--set", "train.task=simclr"], ["--metric test_loss: train.task simclr "
                                                                      "evaluates only test_accuracy"]),
    (SPACE, ["--storage", "postgresql://nobody@127.0.0.1:1/none"], ["--storage postgresql://nobody@127.0.0.1:1/none: "
                                                                    "cannot be reached"]),
    (SPACE, ["--", "--workdir", "x"], ["--workdir after --"]),
    (SPACE, ["--parallel", "2", "--", "--gpus", "2"], ["after --: --gpus 2 needs 2 GPU(s) for each trial; each of "
                                                       "the --parallel 2 trial(s) sees"]),
    # The launcher flags after -- are part of every trial's config: what they make a run refuse, the sweep refuses.
    (SPACE, ["--", "--cpu_replicas", "3"], ["train.global_batch_size 64 is not divisible by the 3 replicas"]),
    (SPACE, ["--", "--workers", "3"], ["train.global_batch_size 64 is not divisible by the 3 replicas"]),
    (SPACE, ["--pruner", "none", "--set", "train.early_stopping_patience=2", "--", "--workers", "2", "--evaluator"],
     ["train.early_stopping_patience"]),
])
def test_bad_input_exits_2_naming_it_and_starts_nothing(tmp_path, space, extra, words):
    result = run_sweep("--job", TINY_JOB, "--space", write_space(tmp_path, space), "--trials", "2",
                       "--workdir", str(tmp_path / "sweep"), *extra, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep" / "trials").exists()


def test_a_float_step_that_spans_the_range_exactly_in_decimal_is_accepted(tmp_path):
    from launcher.sweep_space import load_space
    from resnet18.config import build_config

    space = write_space(tmp_path, "data.cutmix_prob: {type: float, low: 0.1, high: 0.3, step: 0.2}\n")
    (dimension,) = load_space(space, build_config(TINY_JOB))  # 0.3 - 0.1 is 0.19999999999999998 in binary
    assert dimension.step == 0.2


def test_values_that_fail_only_together_fail_their_trial_unrun_and_the_next_is_drawn(tmp_path):
    import optuna

    from launcher import sweep as sweep_module

    space = write_space(tmp_path, "train.global_batch_size: {type: categorical, choices: [64, 96]}\n"
                                  "train.grad_accum_steps: {type: categorical, choices: [1, 64]}\n")
    args, launcher_args = sweep_module.parse_args(["--job", TINY_JOB, "--space", space, "--trials", "12",
                                                   "--workdir", str(tmp_path / "sweep")])
    sweep = sweep_module.checked(args, launcher_args)  # each value alone is valid
    study = optuna.create_study(direction="maximize")
    drawn = []
    while (next_trial := sweep_module.draw(sweep, study)) is not None:
        trial, params = next_trial
        drawn.append(params)
        study.tell(trial, 0.5)
    assert drawn and all(params != {"train.global_batch_size": 96, "train.grad_accum_steps": 64} for params in drawn)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(drawn) + len(failed) == 12 and failed, [trial.params for trial in study.trials]
    for trial in failed:  # 96 images in 64 parts: refused as a run would refuse it
        assert trial.params == {"train.global_batch_size": 96, "train.grad_accum_steps": 64}
        assert "train.grad_accum_steps 64 does not divide the per-replica batch 96" in trial.user_attrs["error"]


@pytest.mark.parametrize("dry_run", [(), ("--dry_run",)])
def test_a_sweep_without_optuna_installed_says_how_to_install_it(tmp_path, dry_run):
    script = ("import sys; sys.modules['optuna'] = None  # as if not installed: importing it raises ImportError\n"
              "from launcher import sweep; sys.exit(sweep.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, "--job", TINY_JOB, "--space", write_space(tmp_path),
                             "--trials", "2", "--workdir", str(tmp_path / "sweep"), *dry_run],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "pip install -e '.[sweep]'" in result.stderr, result.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_new_study_refuses_a_workdir_holding_another_studys_trials(tmp_path):
    old_trial = tmp_path / "sweep" / "trials" / "0"
    old_trial.mkdir(parents=True)
    (old_trial / "config.yaml").write_text("name: tiny\n")
    result = run_sweep("--job", TINY_JOB, "--space", write_space(tmp_path), "--trials", "2", "--workdir",
                       str(tmp_path / "sweep"), "--study_name", "another", timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert (f"--workdir {tmp_path / 'sweep'}: trials/0 are not trials of study 'another' in sqlite:///"
            in result.stderr), result.stderr
    assert sorted(path.name for path in (tmp_path / "sweep" / "trials").iterdir()) == ["0"]
    assert os.listdir(old_trial) == ["config.yaml"]


@pytest.mark.parametrize("flags, refused", [
    # 8 GPUs, 2 trials at once: each trial's 2 workers get 2 of its 4 GPUs, 4 replicas, which split 12.
    (["--parallel", "2", "--", "--workers", "2"], None),
    # 4 trials at once: a trial sees 2 GPUs, too few for 2 workers of 2.
    (["--parallel", "4", "--", "--workers", "2", "--gpus_per_worker", "2"], "needs 4 GPUs; this host shows 2"),
])
def test_the_workers_of_a_trial_are_checked_on_the_gpus_of_its_slot(tmp_path, monkeypatch, flags, refused):
    from launcher.sweep import checked, parse_args
    from resnet18.runtime.errors import LauncherError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    argv = ["--job", TINY_JOB, "--space", write_space(tmp_path), "--trials", "2", "--workdir", str(tmp_path / "a"),
            "--set", "train.global_batch_size=12", *flags]
    if refused is None:
        assert [slot.gpus for slot in checked(*parse_args(argv)).slots] == ["0,1,2,3", "4,5,6,7"]
    else:
        with pytest.raises(LauncherError, match=refused):
            checked(*parse_args(argv))


# --- Which trials are this machine's to resume ---------------------------------------------

def test_a_requeued_slurm_array_task_owns_its_trials_on_any_node(monkeypatch):
    from launcher.sweep import machine_id

    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "44")
    assert machine_id(None) == "slurm-41_3" and machine_id("mine") == "mine"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert machine_id(None) == "slurm-44"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert machine_id(None) == socket.gethostname()


def test_a_machine_resumes_its_own_abandoned_trials_only(tmp_path):
    """Real Optuna trials: abandoned (their sweep process gone, here or on another node) or not, ours or not."""
    import optuna

    from launcher.sweep import Sweep, own_unfinished

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    here, gone_pid = socket.gethostname(), free_pid()
    for machine, host, pid in (("slurm-41_3", "node7", os.getpid()),  # requeued: ran on another node
                               ("slurm-41_3", here, gone_pid),  # its sweep process was killed
                               ("slurm-41_3", here, os.getppid()),  # a live sweep process of ours still runs it
                               ("slurm-41_2", "node7", 1)):  # another array task's
        trial = study.ask()
        for key, value in (("machine", machine), ("host", host), ("sweep_pid", pid)):
            trial.set_user_attr(key, value)
    finished = study.ask()
    finished.set_user_attr("machine", "slurm-41_3")
    study.tell(finished, 1.0)
    sweep = Sweep(None, (), None, [], "", "", (), "slurm-41_3")
    assert [trial.number for trial in own_unfinished(sweep, study)] == [0, 1]


def test_a_new_trial_is_this_machines_only_once_it_names_its_sweep_process(tmp_path):
    """Two sweep processes of one machine id (two on one host, as in the PostgreSQL test below): one starting
    (own_unfinished) while the other makes a trial must not find a trial of this machine without its live process
    and resume it as abandoned. Seen in CI: both ran trial 0, and the later one failed on the finished trial."""
    import optuna

    from launcher.sweep import Sweep, own_new_trial

    written = []

    class Recording(optuna.storages.InMemoryStorage):  # the real storage, its writes noted in order
        def set_trial_user_attr(self, trial_id, key, value):
            super().set_trial_user_attr(trial_id, key, value)
            written.append(key)

    study = optuna.create_study(storage=Recording())
    sweep = Sweep(argparse.Namespace(workdir=str(tmp_path)), (), None, [], "", "", (), "vm")
    trial = study.ask()
    own_new_trial(sweep, trial)
    assert written[-1] == "machine" and {"host", "sweep_pid"} <= set(written), written
    assert trial.user_attrs["sweep_pid"] == os.getpid() and trial.user_attrs["machine"] == "vm"


def test_a_trial_another_sweep_process_recorded_first_is_left_as_recorded(tmp_path, capsys):
    """Two sweep processes with one --machine_id both ran a trial: the later one warns, naming the cause, rather
    than failing with Optuna's traceback, and changes nothing."""
    import optuna

    from launcher.sweep import Active, Sweep, _finished

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    trial = study.ask()
    study.tell(trial, 0.5)  # the other process was first
    process = subprocess.Popen(["true"])
    process.wait()
    sweep = Sweep(argparse.Namespace(workdir=str(tmp_path), metric="test_accuracy"), (), None, [], "", "", (), "vm")
    assert _finished(sweep, study, Active(0, trial._trial_id, {}, None, process, time.time(), 0), False) is None
    assert "trial 0 was recorded by another sweep process (COMPLETE)" in capsys.readouterr().err
    assert study.trials[0].value == 0.5 and "wall_seconds" not in study.trials[0].user_attrs


def test_results_written_while_another_machine_runs_a_trial_say_they_are_not_final(tmp_path, capsys):
    """A machine whose trials ended while another's still runs writes the best of the trials complete now, and
    says which trial it did not wait for; once that one ends, the same results name the true best."""
    from launcher import sweep_results, sweep_space
    from launcher.sweep import checked, open_study, parse_args

    sweep = checked(*parse_args(["--job", TINY_JOB, "--space", write_space(tmp_path), "--trials", "2",
                                 "--workdir", str(tmp_path / "a"), "--machine_id", "a"]))
    study = open_study(sweep)
    mine, theirs = study.ask(), study.ask()
    for trial, machine in ((mine, "a"), (theirs, "b")):
        sweep_space.suggest(trial, sweep.space)
        trial.set_user_attr("machine", machine)
    study.tell(mine, 0.25)
    sweep_results.finish(sweep, study)
    said = capsys.readouterr().out
    assert "Best so far: trial 0" in said and "Not final: trial 1 (b) still runs" in said, said
    best = (tmp_path / "a" / "best.yaml").read_text().splitlines()
    assert best[:2] == [f"# The best trial (0) of sweep {sweep.study_name}: test_accuracy 0.2500",
                        "# Not final when written: trial 1 (b) still runs"]
    assert "Not final when written: trial 1 (b) still runs." in (tmp_path / "a" / "report" / "report.md").read_text()
    study.tell(theirs, 0.5)
    sweep_results.finish(sweep, study)
    said = capsys.readouterr().out
    assert "Best: trial 1" in said and "Not final" not in said, said
    assert (tmp_path / "a" / "best.yaml").read_text().startswith(
        f"# The best trial (1) of sweep {sweep.study_name}: test_accuracy 0.5000\nname: ")


@pytest.mark.parametrize("pruner, pruned", [("none", False), ("median", True)])
def test_a_trial_asks_the_pruner_the_sweep_was_given(tmp_path, monkeypatch, pruner, pruned):
    """Optuna keeps no pruner in its storage: the trial's process must build the sweep's own, not load_study's
    default (a median pruner, which prunes from the 6th trial on even under --pruner none)."""
    import optuna

    from launcher import sweep_trial
    from launcher.sweep import checked, open_study, parse_args

    sweep = checked(*parse_args(["--job", TINY_JOB, "--space", write_space(tmp_path), "--trials", "8",
                                 "--workdir", str(tmp_path / "a"), "--pruner", pruner]))
    study = open_study(sweep)
    for _ in range(5):  # enough finished trials for either median pruner to decide
        trial = study.ask()
        trial.report(0.9, 1)
        study.tell(trial, 0.9)
    poor = study.ask()
    for name, value in sweep.trial_environment(poor._trial_id).items():  # Trial() needs the id
        monkeypatch.setenv(name, value)
    reporter = sweep_trial.reporter_from_environment()
    assert reporter({"epoch": 1, "test_accuracy": 0.1}) is pruned
    assert study.trials[poor.number].intermediate_values == {1: 0.1}
    assert isinstance(optuna.load_study(study_name=sweep.study_name, storage=sweep.storage).pruner,
                      optuna.pruners.MedianPruner)  # what the trial asked before: Optuna's default


def test_tensorboard_is_told_which_trials_failed(tmp_path):
    import optuna
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import api_pb2, metadata

    from launcher import sweep_results, sweep_space
    from launcher.sweep import checked, open_study, parse_args

    sweep = checked(*parse_args(["--job", TINY_JOB, "--space", write_space(tmp_path), "--trials", "2",
                                 "--workdir", str(tmp_path / "a")]))
    study = open_study(sweep)
    done, failed = study.ask(), study.ask()
    for trial in (done, failed):
        sweep_space.suggest(trial, sweep.space)
    study.tell(done, 0.5)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    sweep_results.finish(sweep, study)
    statuses = {}
    for number in (0, 1):
        directory = tmp_path / "a" / "tensorboard" / f"trial-{number}"
        (events,) = directory.iterdir()
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == metadata.SESSION_END_INFO_TAG:
                    data = metadata.parse_session_end_info_plugin_data(value.metadata.plugin_data.content)
                    statuses[number] = api_pb2.Status.Name(data.status)
    assert statuses == {0: "STATUS_SUCCESS", 1: "STATUS_FAILURE"}
    assert [trial["state"] for trial in results(tmp_path / "a")["trials"]] == ["complete", "fail"]


def free_pid() -> int:
    """A process id no process has (a child's, after it was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --- A sweep, end to end ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_sweep(tiny_data_dir, tmp_path_factory):
    """A 4-trial, 2-parallel sweep of the tiny job, one trial killed once on the way: (its output, its directory)."""
    root = tmp_path_factory.mktemp("sweep")
    workdir = root / "sweep"
    run = Running(sweep_command(tiny_data_dir, write_space(root), workdir, sets=("train.epochs=3",),
                                flags=("--pruner", "median")), command=[sys.executable, "-m", "launcher.sweep"])
    try:
        victim = int(run.wait_for(r"^Trial 1 started \(slot \d, pid (\d+)\)").group(1))
        log = workdir / "trials" / "1" / "sweep.log"
        deadline = time.monotonic() + 240
        while "Checkpoint at step" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.5)
        os.killpg(victim, signal.SIGKILL)  # a trial killed mid-training is resumed, not lost
        assert run.finish(timeout=900) == 0, run.output[-4000:]
    finally:
        run.process.kill()
    return run.output, workdir


@pytest.mark.slow
def test_a_sweep_runs_every_trial_resumes_a_killed_one_and_writes_its_results(finished_sweep):
    output, workdir = finished_sweep
    sweep = results(workdir)
    assert [trial["number"] for trial in sweep["trials"]] == [0, 1, 2, 3]
    assert all(trial["state"] in ("complete", "pruned") for trial in sweep["trials"]), sweep["trials"]
    assert "Trial 1 exited -9 (retryable): resuming it from its checkpoints" in output
    assert "Resuming from" in (workdir / "trials" / "1" / "sweep.log").read_text()
    complete = [trial for trial in sweep["trials"] if trial["state"] == "complete"]
    assert complete and all(len(trial["values_per_epoch"]) == 3 for trial in complete)
    best = max(complete, key=lambda trial: trial["value"])
    assert sweep["best"]["number"] == best["number"]
    for trial in sweep["trials"]:  # each an ordinary launcher run in its own directory
        assert (workdir / "trials" / str(trial["number"]) / "config.yaml").exists()
    best_yaml = (workdir / "best.yaml").read_text()
    assert f"learning_rate: {best['params']['train.learning_rate']}" in best_yaml
    for name in ("optimization_history.png", "parallel_coordinates.png", "param_importances.png", "report.md"):
        assert (workdir / "report" / name).stat().st_size > 0, name
    status = subprocess.run([sys.executable, "-m", "launcher.status", "--workdir", str(workdir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "sweep tiny: 4 of 4 trials" in status.stdout
    assert f"best so far: trial {best['number']}" in status.stdout


@pytest.mark.slow
def test_tensorboard_serves_every_trial_in_its_hparams_tab(finished_sweep):
    _, workdir = finished_sweep
    port = free_ports(1)[0]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(workdir / "tensorboard"),
                               "--port", str(port), "--host", "127.0.0.1"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}/data/plugin/hparams"
        deadline = time.monotonic() + 120
        while True:
            try:
                experiment = post(f"{base}/experiment", {"experimentName": ""})
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "TensorBoard did not answer"
                time.sleep(1)
        names = {item["hparam"]["name"] if "hparam" in item else item["name"] for item in experiment["hparamInfos"]}
        assert names == {"train.learning_rate", "train.label_smoothing"}
        groups = post(f"{base}/session_groups", {"experimentName": "", "allowedStatuses": [
            "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"], "colParams": [],
            "startIndex": 0, "sliceSize": 100})
        shown = {group["name"]: group for group in groups["sessionGroups"]}
        trials = results(workdir)["trials"]
        assert set(shown) == {f"trial-{trial['number']}" for trial in trials}
        for trial in trials:  # its values, and its metric at its last epoch (stored as float32)
            group = shown[f"trial-{trial['number']}"]
            assert group["hparams"] == pytest.approx(trial["params"], rel=0, abs=0)
            last_epoch, last_value = max((int(epoch), value) for epoch, value in trial["values_per_epoch"].items())
            (metric,) = group["metricValues"]
            assert metric["name"]["tag"] == "test_accuracy" and metric["trainingStep"] == last_epoch
            assert metric["value"] == pytest.approx(last_value, rel=2**-24)
            assert group["sessions"][0]["status"] == "STATUS_SUCCESS"
    finally:
        server.terminate()
        server.wait(timeout=30)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


# --- Kill the sweep, start it again ---------------------------------------------------------

@pytest.mark.slow
def test_a_killed_sweep_resumes_its_trials_exactly_and_runs_no_more(tiny_data_dir, tmp_path):
    space = write_space(tmp_path)
    command = sweep_command(tiny_data_dir, space, tmp_path / "sweep", sets=("train.epochs=3",),
                            flags=("--pruner", "none"), trials=2)
    run = Running(command, command=[sys.executable, "-m", "launcher.sweep"])
    run.wait_for(r"^Trial 1 started")
    pids = {int(pid) for pid in re.findall(r"Trial \d started \(slot \d, pid (\d+)\)", run.output)}
    logs = [tmp_path / "sweep" / "trials" / str(number) / "sweep.log" for number in (0, 1)]
    deadline = time.monotonic() + 240
    while not all("Checkpoint at step" in (log.read_text() if log.exists() else "") for log in logs):
        assert time.monotonic() < deadline, "no checkpoints"
        time.sleep(0.1)
    trained = ["Final weights sha256" in log.read_text() for log in logs]  # a trial's last steps are quick
    run.process.kill()  # kill -9 of the sweep: its trials are told (SIGTERM), save a checkpoint and end
    run.finish(timeout=60)
    from resnet18.runtime.files import is_running

    deadline = time.monotonic() + 120
    while any(is_running(pid) for pid in pids):
        assert time.monotonic() < deadline, "the trials of a killed sweep go on training"
        time.sleep(0.5)
    assert not all(trained)
    for log, done in zip(logs, trained):  # a SIGTERM after the last step lets the run finish (exit 0)
        assert done or re.search(r"preempted \(SIGTERM\): checkpoint saved at step|SIGTERM after the last "
                                 "training step", log.read_text()), log
    again = Running(command, command=[sys.executable, "-m", "launcher.sweep"])
    assert again.finish(timeout=900) == 0, again.output[-4000:]
    assert "Trial 0 resumed" in again.output and "Trial 1 resumed" in again.output
    assert "Trial 2" not in again.output  # never more than --trials
    sweep = results(tmp_path / "sweep")
    assert [trial["state"] for trial in sweep["trials"]] == ["complete", "complete"]
    for trial in sweep["trials"]:
        log = (tmp_path / "sweep" / "trials" / str(trial["number"]) / "sweep.log").read_text()
        resumed_at = int(re.search(r"Resuming from \S+ at step (\d+)/", log).group(1))
        assert resumed_at > 0  # steps were not repeated from the start
        # The same final weights as the same trial run without a stop.
        reference = subprocess.run(
            [sys.executable, "-m", "launcher", "--job", TINY_JOB, "--workdir", str(tmp_path / f"ref{trial['number']}"),
             "--set", f"data.data_dir={tiny_data_dir}", "train.deterministic=true", "train.epochs=3",
             *[f"{key}={value}" for key, value in trial["params"].items()]], cwd=REPO, capture_output=True,
            text=True, timeout=600, env={**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"})
        assert reference.returncode == 0, reference.stderr[-2000:]
        assert FINGERPRINT.findall(log)[-1] == FINGERPRINT.findall(reference.stdout)[-1], trial["number"]


@pytest.mark.slow
def test_a_resumed_trial_first_stops_a_run_still_going_in_its_directory(tiny_data_dir, tmp_path):
    """A sweep process started again after a kill -9 resumes its trials: a run the dead one left (still saving
    after its SIGTERM, or unaware of it) is stopped first, with the same SIGTERM, so it keeps its checkpoint."""
    from launcher.processes import stop_runs_in

    workdir = tmp_path / "sweep" / "trials" / "0"
    run = Running(["--job", TINY_JOB, "--workdir", str(workdir), "--set", f"data.data_dir={tiny_data_dir}",
                   "train.epochs=50"])
    try:
        run.wait_for(r"^Checkpoint at step")
        assert stop_runs_in([str(tmp_path / "sweep" / "trials" / "1")], grace=120) == {}
        there = str(tmp_path / "sweep" / "trials" / ".." / "trials" / "0")
        assert stop_runs_in([there], grace=120) == {there: [run.process.pid]}
        assert run.finish(timeout=10) == 138, run.output[-3000:]
    finally:
        run.process.kill()
    assert "preempted (SIGTERM): checkpoint saved at step" in run.output


# --- A trial that fails -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_failing_trial_is_recorded_with_its_error_and_the_sweep_goes_on(tiny_data_dir, tmp_path):
    # The sampler is seeded by --seed and the trial count: with seed 3 the 4 trials draw both choices.
    space = write_space(tmp_path, "train.init_from: {type: categorical, choices: [null, /nonexistent/run]}\n")
    result = run_sweep(*sweep_command(tiny_data_dir, space, tmp_path / "sweep", sets=("train.epochs=1",),
                                      flags=("--pruner", "none", "--seed", "3")), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = results(tmp_path / "sweep")["trials"]
    failed = [trial for trial in trials if trial["params"]["train.init_from"] == "/nonexistent/run"]
    assert failed and all(trial["state"] == "fail" for trial in failed)
    assert all("train.init_from '/nonexistent/run' holds no run" in trial["error"] and "(exit 2)" in trial["error"]
               for trial in failed)
    assert all(trial["state"] == "complete" for trial in trials if trial not in failed)


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_exits_1(tiny_data_dir, tmp_path):
    """It exited 0, so a Slurm array task or a script took a sweep with no result for a finished one."""
    space = write_space(tmp_path, "train.init_from: {type: categorical, choices: [/nonexistent/run]}\n")
    result = run_sweep(*sweep_command(tiny_data_dir, space, tmp_path / "sweep", trials=2), timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error: no trial of study 'tiny' completed: 2 failed (their errors are in" in result.stderr
    assert [trial["state"] for trial in results(tmp_path / "sweep")["trials"]] == ["fail", "fail"]


# --- Two machines, one PostgreSQL server --------------------------------------------------------

def postgres_binaries() -> str | None:
    found = sorted(path for path in (f"/usr/lib/postgresql/{version}/bin" for version in range(20, 9, -1))
                   if os.path.exists(os.path.join(path, "initdb")))
    return found[0] if found else None


@pytest.fixture
def postgres():
    """A PostgreSQL server in a temporary directory (as user postgres when this runs as root): its URL."""
    binaries = postgres_binaries()
    if binaries is None:
        server_missing("PostgreSQL (Debian's postgresql)")
    root = tempfile.mkdtemp(prefix="sweep_postgres_")  # not under pytest's private 0700 directory
    data = os.path.join(root, "data")
    run_as = ["/bin/sh", "-c"]
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        run_as = ["su", "postgres", "-s", "/bin/sh", "-c"]
    port = free_ports(1)[0]
    try:
        subprocess.run([*run_as, f"{binaries}/initdb -D {data} -A trust -U sweep >/dev/null"], check=True,
                       timeout=120)
        subprocess.run([*run_as, f"{binaries}/pg_ctl -D {data} -l {root}/log -w -o '-p {port} -k {root} "
                                 f"-c listen_addresses=127.0.0.1' start >/dev/null"], check=True, timeout=120)
        yield f"postgresql://sweep@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, f"{binaries}/pg_ctl -D {data} -m fast -w stop >/dev/null 2>&1"], timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_sweep_processes_share_one_postgresql_study_as_two_machines_would(tiny_data_dir, tmp_path, postgres):
    space = write_space(tmp_path)
    machines = [Running(sweep_command(tiny_data_dir, space, tmp_path / name, sets=("train.epochs=1",),
                                      flags=("--storage", postgres, "--pruner", "none"), parallel=1),
                        command=[sys.executable, "-m", "launcher.sweep"]) for name in ("a", "b")]
    codes = [machine.finish(timeout=900) for machine in machines]
    assert codes == [0, 0], machines[0].output[-3000:] + machines[1].output[-3000:]
    ran = [{int(number) for number in re.findall(r"^Trial (\d+) done", machine.output, re.M)} for machine in machines]
    assert ran[0] and ran[1] and not ran[0] & ran[1]  # both machines worked, never on the same trial
    assert ran[0] | ran[1] == {0, 1, 2, 3}  # one sweep of 4 trials, not two of 4
    for name in ("a", "b"):
        assert len(results(tmp_path / name)["trials"]) == 4  # each sees the whole study
    # A machine whose trials ended while the other's still ran wrote the best of the trials complete then, and
    # said so; the last one to finish did not need to.
    for name, machine in zip(("a", "b"), machines):
        assert ("Not final:" in machine.output) == ("# Not final when written:" in (tmp_path / name / "best.yaml")
                                                    .read_text()), machine.output[-2000:]
    assert not all("Not final:" in machine.output for machine in machines)
    # The same command again, once every trial ended, runs nothing and writes the final results: both machines
    # name the study's best trial, with its config built from the study (it ran on one machine only).
    for name in ("a", "b"):
        again = run_sweep(*sweep_command(tiny_data_dir, space, tmp_path / name, sets=("train.epochs=1",),
                                         flags=("--storage", postgres, "--pruner", "none"), parallel=1))
        assert again.returncode == 0 and "Not final" not in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
        assert not re.search(r"^Trial \d+ (started|resumed)", again.stdout, re.M), again.stdout[-2000:]
    best = (tmp_path / "a" / "best.yaml").read_text()
    assert best == (tmp_path / "b" / "best.yaml").read_text()
    import optuna

    study = optuna.load_study(study_name="tiny", storage=postgres)
    assert best.startswith(f"# The best trial ({study.best_trial.number}) of sweep tiny: "
                           f"test_accuracy {study.best_value:.4f}\nname: tiny\n"), best[:300]


def test_a_signal_to_the_trials_never_reaches_a_process_that_took_an_ended_trials_pid(tmp_path):
    """The sweep signals each trial's process group by pid. A trial its loop has already reaped may still be in
    the list when a SIGTERM comes; its pid, free again, may belong to another process group by then (pids
    wrap: pid_max is 32768 on many machines). The kernel is asked for exactly that pid (ns_last_pid)."""
    from launcher.sweep import _signal

    trial = subprocess.Popen(["true"], start_new_session=True)
    trial.wait()  # reaped, as the sweep's poll() reaps a trial that ended
    for _ in range(20):  # another process may fork in between: try again
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w", encoding="utf-8") as stream:
                stream.write(str(trial.pid - 1))
        except OSError as error:  # not root, or a read-only /proc/sys
            pytest.skip(f"cannot choose the next pid here (/proc/sys/kernel/ns_last_pid: {error.strerror})")
        stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
        if stranger.pid == trial.pid:
            break
        stranger.kill()
        stranger.wait()
    assert stranger.pid == trial.pid, "the kernel gave no process the ended trial's pid"
    try:
        _signal(trial, signal.SIGTERM)
        time.sleep(0.5)
        assert stranger.poll() is None, f"a stranger holding pid {trial.pid} got the trials' signal"
    finally:
        stranger.kill()
        stranger.wait()
