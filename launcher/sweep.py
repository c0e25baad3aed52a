"""Hyperparameter search: `python -m launcher.sweep`, trials as ordinary launcher runs, Optuna deciding.

    python -m launcher.sweep --job JOB.yaml --space SPACE.yaml --trials N --workdir DIR
        [--parallel K] [--storage URL] [--metric test_accuracy] [--direction maximize]
        [--pruner asha|hyperband|median|none] [--seed S] [--dry_run] [-- launcher flags: --workers 2, --gpus 1]

- The search is Optuna's: a TPE sampler (seeded; random for the first trials) and, per
  epoch, a pruner (asha: successive halving; hyperband; median; none). The study lives in
  `--storage`: an SQLite file in DIR by default; a PostgreSQL or MySQL URL, or
  `journal:/shared/file.log`, make one sweep of the same command run on many machines.
- Each trial is an ordinary launcher run in DIR/trials/<number>/ (config.yaml,
  checkpoints, history, report) with the space's values as `--set` and the launcher flags
  after `--`, so a trial can be `--workers 2`, `--gpus 1` or a TPU. `--parallel K` runs K
  trials at once here, each with its share of the cores (threads) or GPUs.
- Pruning: each trial's chief reports its metric every epoch (launcher/sweep_trial.py);
  a pruned trial stops at that epoch's end, its checkpoint kept, and is recorded as pruned.
- Faults: a trial that exits 138 (preempted, stalled, lost a peer) or is killed is
  restarted and resumes from its checkpoints, up to --trial_restarts times; one that exits
  1 or 2 is recorded as failed with its error line and the sweep goes on. A sweep killed
  and started again with the same command resumes this machine's unfinished trials from
  their checkpoints, never starts a finished one again and never runs more than --trials
  (a killed sweep's trials get SIGTERM, save and exit; one still saving is stopped first).
  "This machine" is --machine_id: by default the Slurm array task (or job), which a requeued
  task keeps on whatever node it lands, else the host name.
- Results: DIR/sweep.json (every trial: params, state, value, per-epoch values, wall
  time, work directory; the best), DIR/best.yaml (the best trial's config, runnable with
  --job), TensorBoard HParams summaries in DIR/tensorboard/, and DIR/report/ (history,
  parallel coordinates, importances, report.md). `python -m launcher.status --workdir DIR`.

Exit codes: 0 done (failed trials are in the results); 1 done, but no trial completed; 2 bad
input (flag, job, space, storage), nothing started; 138 stopped by SIGTERM/SIGINT (run the
same command to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from launcher import sweep_results, sweep_space, sweep_trial
from launcher.flags import FlagError, FlagParser, integer, nonempty, work_directory
from launcher.local_workers import DEFAULT_PREEMPTION_GRACE_SECONDS
from launcher.processes import gpu_slices, stop_runs_in, visible_gpu_ids
from resnet18 import tasks
from resnet18.config import Config
from resnet18.runtime.errors import EXIT_FAILURE, EXIT_OK, EXIT_RETRYABLE, ConfigError, LauncherError, SetupError

POLL_SECONDS = 0.2  # how soon a slot whose trial ended gets the next
WRITE_SECONDS = 10.0  # sweep.json: at once when a trial starts or ends, else this often
RETRYABLE = (EXIT_RETRYABLE, 130, 137, 143)
EXIT_SECONDS = 30  # beyond its preemption grace, for a trial's run told to stop to end
FORBIDDEN_FLAGS = ("--job", "--workdir", "--set", "--dry_run")  # the sweep gives each trial these


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one of the K parallel trials runs: its threads and GPUs."""

    index: int
    threads: int
    gpus: str | None  # CUDA_VISIBLE_DEVICES (None: as the environment)

    def environment(self) -> dict[str, str]:
        env = {"TF_NUM_INTRAOP_THREADS": str(self.threads), "TF_NUM_INTEROP_THREADS": str(min(2, self.threads)),
               "OMP_NUM_THREADS": str(self.threads)}
        return env if self.gpus is None else dict(env, CUDA_VISIBLE_DEVICES=self.gpus)


@dataclasses.dataclass
class Active:
    """A trial running now."""

    number: int
    trial_id: int
    params: dict[str, Any]
    slot: Slot
    process: subprocess.Popen
    started: float
    restarts: int = 0


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A checked sweep: the job, its space, the study and where trials run."""

    args: argparse.Namespace
    launcher_args: tuple[str, ...]
    job: Config
    space: list[sweep_space.Dimension]
    storage: str
    study_name: str
    slots: tuple[Slot, ...]
    machine: str  # owns the trials this process starts (machine_id)
    preemption_grace: float = DEFAULT_PREEMPTION_GRACE_SECONDS  # a trial's run told to stop saves within it

    @property
    def direction(self) -> str:
        """--direction, else minimize a loss and maximize anything else."""
        return self.args.direction or ("minimize" if "loss" in self.args.metric else "maximize")

    def trial_dir(self, number: int) -> str:
        return os.path.join(self.args.workdir, "trials", str(number))

    def trial_environment(self, trial_id: int) -> dict[str, str]:
        """What tells a trial's run it is one (launcher/sweep_trial.py reads it)."""
        return sweep_trial.environment(self.storage, self.study_name, trial_id, self.args.metric, self.args.pruner)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    own, launcher_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = FlagParser(prog="python -m launcher.sweep", description=__doc__.splitlines()[0],
                                     epilog="Launcher flags for every trial go after --, e.g. -- --workers 2")
    parser.add_argument("--job", required=True, type=nonempty, help="the YAML job every trial runs (see jobs/)")
    parser.add_argument("--space", required=True, type=nonempty, help="SPACE.yaml: config keys -> distributions")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config keys set for every trial, e.g. --set train.epochs=10 (before the space's)")
    parser.add_argument("--trials", type=integer(1), required=True, help="trials in the whole sweep (all machines)")
    parser.add_argument("--workdir", required=True, type=work_directory,
                        help="the sweep's directory: trials/, sweep.json, report/")
    parser.add_argument("--parallel", type=integer(1), default=1, help="trials at once on this machine (default 1)")
    parser.add_argument("--storage", type=nonempty,
                        help="the study's storage: sqlite:///..., postgresql://..., mysql://..., or journal:PATH "
                             "(default: an SQLite file in --workdir)")
    parser.add_argument("--study_name", type=nonempty, help="the study's name in --storage (default: the job's name)")
    parser.add_argument("--metric", default="test_accuracy", help="what each trial is scored by (default "
                                                                  "test_accuracy; test_loss)")
    parser.add_argument("--direction", choices=("maximize", "minimize"), default=None,
                        help="default: maximize for accuracies, minimize for losses")
    parser.add_argument("--pruner", choices=sweep_trial.PRUNERS, default="asha",
                        help="stops poor trials early (default asha)")
    parser.add_argument("--seed", type=integer(0), default=0, help="the sampler's seed (default 0)")
    parser.add_argument("--trial_restarts", type=integer(0), default=2,
                        help="restarts of a trial that exits 138 or is killed (default 2)")
    parser.add_argument("--machine_id", type=nonempty,
                        help="who owns this process's trials, to resume them after a kill: default the Slurm "
                             "array task or job, else the host name")
    parser.add_argument("--dry_run", action="store_true", help="check everything, print the plan, start nothing")
    return parser.parse_args(own), launcher_args


def checked(args: argparse.Namespace, launcher_args: list[str]) -> Sweep:
    """Everything checked before anything starts (ConfigError naming what is wrong: exit 2)."""
    try:
        import optuna  # noqa: F401  (an extra: the launcher itself does not need it)
    except ImportError:
        raise SetupError("python -m launcher.sweep needs Optuna, which is not installed: "
                         "pip install -e '.[sweep]' (Optuna, and psycopg for a PostgreSQL storage)") from None
    given = [flag for flag in FORBIDDEN_FLAGS if any(arg.split("=")[0] == flag for arg in launcher_args)]
    if given:
        raise ConfigError(f"{', '.join(given)} after --: the sweep gives every trial its own --job, --workdir and "
                          "--set (the sweep's own --set applies to every trial)")
    from launcher.__main__ import check_flag_combinations, config_of, local_worker_layout
    from launcher.__main__ import parse_args as launcher_parse_args

    try:  # what every trial's launcher would refuse, refused once here
        launcher = launcher_parse_args(["--job", args.job, *launcher_args])
        check_flag_combinations(launcher)
    except FlagError as error:
        raise FlagError(f"after --: {error}") from None
    # The job as every trial's run sees it: the sweep's --set, then the flags after -- (--cpu_replicas, --evaluator).
    job = config_of(argparse.Namespace(**dict(vars(launcher), overrides=args.overrides)))
    slots = _slots(args.parallel, launcher.workers or 1)
    if launcher.workers is not None:  # on the GPUs each trial sees: its slot's share
        local_worker_layout(job, launcher, visible=slots[0].gpus.split(",") if slots[0].gpus else [])
    elif launcher.gpus and launcher.gpus > (shown := len(slots[0].gpus.split(",")) if slots[0].gpus else 0):
        raise ConfigError(f"after --: --gpus {launcher.gpus} needs {launcher.gpus} GPU(s) for each trial; each of "
                          f"the --parallel {args.parallel} trial(s) sees {shown} of this host's")
    task = tasks.task_of(job)
    if args.metric not in task.metrics:
        raise ConfigError(f"--metric {args.metric}: train.task {task.name} evaluates only {', '.join(task.metrics)}")
    if args.pruner != "none" and job.train.evaluation == "sidecar":  # --evaluator included
        raise ConfigError(f"--pruner {args.pruner} decides after each epoch's evaluation, which a sidecar evaluator "
                          "makes later, in another task: use train.evaluation inline or --pruner none")
    space = sweep_space.load_space(args.space, job)
    storage = args.storage or f"sqlite:///{os.path.abspath(os.path.join(args.workdir, 'sweep.db'))}"
    return Sweep(args, tuple(launcher_args), job, space, storage, args.study_name or job.name, slots,
                 machine_id(args.machine_id), launcher.preemption_grace or DEFAULT_PREEMPTION_GRACE_SECONDS)


def _slots(parallel: int, processes_per_trial: int) -> tuple[Slot, ...]:
    """K slots: the visible GPUs split evenly (as --workers does), else the cores, so K trials do not oversubscribe."""
    threads = max(1, (os.cpu_count() or 1) // (parallel * processes_per_trial))
    gpus = gpu_slices(parallel, None, visible_gpu_ids())
    return tuple(Slot(index, threads, gpus[index]) for index in range(parallel))


def open_study(sweep: Sweep):
    """The study (created, or loaded if it exists), with its sampler and pruner.

    Raises:
      ConfigError: the storage cannot be reached (exit 2).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sweep.storage.startswith("sqlite:"):
        os.makedirs(sweep.args.workdir, exist_ok=True)
    try:
        return optuna.create_study(storage=sweep_trial.open_storage(sweep.storage), study_name=sweep.study_name,
                                   direction=sweep.direction, load_if_exists=True,
                                   pruner=sweep_trial.make_pruner(sweep.args.pruner))
    except Exception as error:  # SQLAlchemy, psycopg2, a file system: any way a storage is out of reach
        raise ConfigError(f"--storage {sweep.storage}: cannot be reached ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:300]})") from None


def _sampler(args: argparse.Namespace, trials_so_far: int):
    """Seeded by the sweep's seed and the number of trials so far, so a restarted sweep draws what it would have."""
    import numpy as np
    import optuna

    seed = int(np.random.SeedSequence([args.seed, trials_so_far]).generate_state(1)[0])  # unrelated streams
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)


# --- Running trials ------------------------------------------------------------------------

def start_trial(sweep: Sweep, number: int, trial_id: int, params: dict[str, Any], slot: Slot, restarts: int = 0
                ) -> Active:
    """Starts (or resumes: the same work directory) one trial as an ordinary launcher run."""
    workdir = sweep.trial_dir(number)
    os.makedirs(workdir, exist_ok=True)
    command = [sys.executable, "-m", "launcher", "--job", os.path.abspath(sweep.args.job), "--workdir", workdir,
               "--set", *sweep.args.overrides, *sweep_space.overrides(params), *sweep.launcher_args]
    env = dict(os.environ, **slot.environment(), **sweep.trial_environment(trial_id))
    with open(os.path.join(workdir, "sweep.log"), "a", encoding="utf-8") as log:
        log.write(f"===== {time.strftime('%Y-%m-%dT%H:%M:%S')} trial {number}, start {restarts}: "
                  f"{' '.join(command)} =====\n")
        log.flush()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    print(f"Trial {number} {'resumed' if restarts else 'started'} (slot {slot.index}, pid {process.pid}): "
          + ", ".join(f"{key}={value}" for key, value in params.items()), flush=True)
    return Active(number, trial_id, params, slot, process, time.time(), restarts)


def machine_id(given: str | None) -> str:
    """Who owns the trials this sweep process starts: --machine_id, else the Slurm array task or job (a
    requeued one keeps it, on whatever node it lands), else the host name."""
    if given:
        return given
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return socket.gethostname()


def check_trial_directories(sweep: Sweep, study) -> None:
    """Every trial directory in --workdir is one of this study's trials: a trial runs where its number says,
    so a new study (another --study_name or --storage, a deleted sweep.db) in an old --workdir would resume
    the old checkpoints as its own trials' and record their results under its new values.

    Raises:
      ConfigError: directories of trials the study does not have (exit 2), before anything starts.
    """
    root = os.path.join(sweep.args.workdir, "trials")
    # Listed before the study is read: another machine sharing both makes a trial's directory after the trial.
    names = os.listdir(root) if os.path.isdir(root) else []
    numbers = {trial.number for trial in study.get_trials(deepcopy=False)}
    foreign = sorted(int(name) for name in names if name.isdigit() and int(name) not in numbers)
    if foreign:
        raise ConfigError(f"--workdir {sweep.args.workdir}: trials/{', trials/'.join(map(str, foreign[:5]))}"
                          f"{' ...' if len(foreign) > 5 else ''} are not trials of study {sweep.study_name!r} in "
                          f"{sweep.storage}; use a new --workdir, or the --study_name and --storage that ran them")


def own_unfinished(sweep: Sweep, study) -> list:
    """This machine's trials left running by a sweep process that is gone (a kill -9, a reboot, a requeue)."""
    import optuna

    return [trial for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if trial.user_attrs.get("machine") == sweep.machine and not _alive(trial.user_attrs.get("host"),
                                                                               trial.user_attrs.get("sweep_pid"))]


def _alive(host: Any, pid: Any) -> bool:
    """Whether the sweep process that last ran a trial still does (one on another host, as after a requeue, does
    not: a machine id runs one sweep process at a time)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
        return int(pid) != os.getpid()
    except (TypeError, ValueError, ProcessLookupError, PermissionError):
        return False


def run(sweep: Sweep) -> int:
    """Runs the sweep to its end on this machine; returns the exit code."""
    study = open_study(sweep)
    check_trial_directories(sweep, study)
    resumes = own_unfinished(sweep, study)
    leftovers = stop_runs_in([sweep.trial_dir(trial.number) for trial in resumes],
                             sweep.preemption_grace + EXIT_SECONDS)
    for workdir, pids in leftovers.items():
        print(f"Stopped a run an earlier sweep process left in {workdir} (pid {', '.join(map(str, pids))}) before "
              "resuming its trial", flush=True)
    active: list[Active] = []
    stopping: list[int] = []

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        stopping.append(signum)
        for trial in active:
            _signal(trial.process, signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        budget_left, written = True, 0.0
        while True:
            changed = False
            for slot in [slot for slot in sweep.slots if not any(trial.slot == slot for trial in active)]:
                if stopping:
                    break
                if resumes:
                    trial = resumes.pop(0)
                    _claim(study, trial._trial_id)  # FrozenTrial keeps its id private; Trial() needs it
                    active.append(start_trial(sweep, trial.number, trial._trial_id, dict(trial.params), slot, 1))
                    changed = True
                elif budget_left:
                    started = _ask(sweep, study, slot)
                    budget_left = started is not None
                    active += [started] if started else []
                    changed = True
            for trial in [trial for trial in active if trial.process.poll() is not None]:
                active.remove(trial)
                restarted = _finished(sweep, study, trial, bool(stopping))
                active += [restarted] if restarted else []
                changed = True
            if changed or time.monotonic() - written > WRITE_SECONDS:  # and the epochs reported meanwhile
                sweep_results.write(sweep, study)
                written = time.monotonic()
            if not active and (stopping or (not resumes and not budget_left)):
                break
            time.sleep(POLL_SECONDS)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopping:
        print(f"Stopped by {signal.Signals(stopping[0]).name}: the running trials saved a checkpoint; run the same "
              "command to resume them", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE
    content = sweep_results.finish(sweep, study)
    failed = [trial for trial in content["trials"] if trial["state"] == "fail"]
    if not content["best"] and failed and not sweep_results.running_elsewhere(content):
        print(f"error: no trial of study {sweep.study_name!r} completed: {len(failed)} failed (their errors are in "
              f"{os.path.join(sweep.args.workdir, 'sweep.json')})", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    return EXIT_OK


def _claim(study, trial_id: int) -> None:
    """Marks a trial as this sweep process's (for a later restart to tell abandoned trials from running ones)."""
    _runs_here(_running_trial(study, trial_id))


def _runs_here(trial) -> None:
    """Records the sweep process that runs `trial`: its pid first, since another sweep process of this machine
    id starting meanwhile (own_unfinished) takes a trial of this host whose process is gone for abandoned."""
    trial.set_user_attr("sweep_pid", os.getpid())
    trial.set_user_attr("host", socket.gethostname())


def own_new_trial(sweep: Sweep, trial) -> None:
    """Makes a trial just asked this machine's: the machine id last, once the process running it is named, or
    another sweep process of this machine id starting meanwhile would resume it as abandoned."""
    trial.set_user_attr("workdir", sweep.trial_dir(trial.number))
    _runs_here(trial)
    trial.set_user_attr("machine", sweep.machine)


def _running_trial(study, trial_id: int):
    """The live Trial of a trial id (Optuna's own handle for a trial another process started)."""
    import optuna

    return optuna.trial.Trial(study, trial_id)


def _ask(sweep: Sweep, study, slot: Slot) -> Active | None:
    """A new trial within --trials (None when the budget is spent, on every machine sharing the study)."""
    drawn = draw(sweep, study)
    if drawn is None:
        return None
    trial, params = drawn
    own_new_trial(sweep, trial)
    return start_trial(sweep, trial.number, trial._trial_id, params, slot)  # Trial() in the run needs the id


def draw(sweep: Sweep, study) -> tuple[Any, dict[str, Any]] | None:
    """A new trial within --trials and its values; None when the budget is spent, on every machine sharing
    the study. Values that fail only together (each alone was checked: a batch size and an accumulation)
    fail their trial, not run, and the next is drawn.

    Raises:
      ConfigError: Optuna could not draw the values (the trial is failed first, not left running; exit 2).
    """
    import optuna

    while len(study.get_trials(deepcopy=False)) < sweep.args.trials:
        study.sampler = _sampler(sweep.args, len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        if trial.number >= sweep.args.trials:  # another machine took the last one meanwhile
            trial.set_user_attr("error", "beyond --trials: not run")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
        try:
            params = sweep_space.suggest(trial, sweep.space)
        except Exception as error:  # noqa: BLE001 - whatever Optuna raised, the trial must not stay RUNNING
            trial.set_user_attr("error", f"not drawn: {type(error).__name__}: {error}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise ConfigError(f"--space {sweep.args.space}: trial {trial.number} could not be drawn "
                              f"({type(error).__name__}: {error})") from None
        try:
            sweep_space.with_value(sweep.job, params, f"trial {trial.number}")
        except ConfigError as error:
            trial.set_user_attr("error", f"not run: {error}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"Trial {trial.number} not run: {error}", flush=True)
            continue
        return trial, params
    return None


def _finished(sweep: Sweep, study, trial: Active, stopping: bool) -> Active | None:
    """Records how a trial ended; returns it restarted when it may be (138, killed)."""
    import optuna

    code = trial.process.returncode
    seconds = time.time() - trial.started
    frozen = next(item for item in study.get_trials(deepcopy=False) if item.number == trial.number)
    if frozen.state.is_finished():  # another sweep process ran it too, and recorded it first
        print(f"warning: trial {trial.number} was recorded by another sweep process ({frozen.state.name}) while this "
              f"one ran it too; its record stands. Two sweep processes of machine id {sweep.machine!r} resumed it: "
              "give each its own --machine_id", file=sys.stderr, flush=True)
        return None
    _running_trial(study, trial.trial_id).set_user_attr("wall_seconds",
                                                        frozen.user_attrs.get("wall_seconds", 0.0) + seconds)
    if code == 0:
        summary = sweep_results.read_summary(sweep.trial_dir(trial.number))
        value = (summary or {}).get(sweep.args.metric)
        pruned_at = frozen.user_attrs.get("pruned_at_epoch")
        if pruned_at is not None and pruned_at < (summary or {}).get("epochs", 0):  # pruned after the last: done
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
            print(f"Trial {trial.number} pruned after epoch {(summary or {}).get('stopped_early_after_epoch')}",
                  flush=True)
        elif value is None:
            _failed(study, trial, f"exit 0 but no {sweep.args.metric} in its summary.json")
        else:
            study.tell(trial.number, value)
            print(f"Trial {trial.number} done: {sweep.args.metric} {value:.4f}", flush=True)
        return None
    if stopping:
        return None  # left running: the same command resumes it
    if (code < 0 or code in RETRYABLE) and trial.restarts < sweep.args.trial_restarts:
        print(f"Trial {trial.number} exited {code} (retryable): resuming it from its checkpoints", flush=True)
        return start_trial(sweep, trial.number, trial.trial_id, trial.params, trial.slot, trial.restarts + 1)
    _failed(study, trial, sweep_results.error_line(sweep.trial_dir(trial.number), code))
    return None


def _failed(study, trial: Active, error: str) -> None:
    import optuna

    _running_trial(study, trial.trial_id).set_user_attr("error", error)
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    print(f"Trial {trial.number} failed: {error}", flush=True)


def _signal(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is not None:  # reaped: its pid may be another process group's by now
        return
    try:
        os.killpg(process.pid, signum)  # the trial and, for --workers, its group
    except ProcessLookupError:
        pass


def describe(sweep: Sweep) -> str:
    """The plan, as the dry run prints it."""
    lines = [f"study: {sweep.study_name} in {sweep.storage} (this machine: {sweep.machine})",
             f"metric: {sweep.args.metric} ({sweep.direction}), pruner {sweep.args.pruner}, TPE sampler "
             f"(seed {sweep.args.seed})",
             f"trials: {sweep.args.trials} in all, {len(sweep.slots)} at once here, each in "
             f"{os.path.join(sweep.args.workdir, 'trials', '<number>')}"]
    lines += [f"space: {dimension.key}: " + (f"one of {list(dimension.choices)}" if dimension.kind == "categorical"
                                            else f"{dimension.kind} in [{dimension.low}, {dimension.high}]"
                                            + (" (log)" if dimension.log else "")) for dimension in sweep.space]
    lines += [f"slot {slot.index}: {slot.threads} thread(s) per process"
              + (f", CUDA_VISIBLE_DEVICES={slot.gpus!r}" if slot.gpus is not None else "") for slot in sweep.slots]
    lines.append("each trial: python -m launcher --job " + sweep.args.job + " --workdir <trial> --set "
                 + " ".join([*sweep.args.overrides, "<values>", *sweep.launcher_args]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args, launcher_args = parse_args(argv)
        sweep = checked(args, launcher_args)
        if args.dry_run:
            open_study(sweep) if args.storage else None  # a shared storage must be reachable
            print(describe(sweep), flush=True)
            return EXIT_OK
        print(describe(sweep), flush=True)
        return run(sweep)
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
