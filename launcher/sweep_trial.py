"""Inside a sweep's trial: report each epoch's metric to the study, and stop where its pruner says.

`python -m launcher.sweep` starts every trial as an ordinary launcher run with
LAUNCHER_SWEEP_TRIAL set (JSON: storage, study, trial id, metric, pruner, the sweep's pid). The chief of that run
reports the metric of every evaluated epoch to the trial (the epoch is the step) and asks
the study's pruner whether to go on; a pruned trial stops at that epoch's end, its
checkpoint kept, like early stopping. Epochs reported before a restart are not reported
again: a resumed trial goes on where it was.

    LAUNCHER_SWEEP_TRIAL='{"storage": ..., "study": ..., "trial_id": 3, "metric": ..., "pruner": "asha",
                           "sweep_pid": 4242}' python -m launcher ...
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from typing import Any, Callable

VARIABLE = "LAUNCHER_SWEEP_TRIAL"
CREATE_ATTEMPTS = 5
PRUNERS = ("asha", "hyperband", "median", "none")


def make_pruner(name: str):
    """The Optuna pruner --pruner NAME means. Optuna keeps no pruner in its storage, so the sweep and every
    trial's run build it here from the name (`load_study` would otherwise give Optuna's default, a median
    pruner)."""
    import optuna

    return {"asha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3),
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "none": optuna.pruners.NopPruner}[name]()


def open_storage(url: str):
    """An Optuna storage for URL: sqlite:///..., postgresql://..., mysql://..., or journal:PATH (a file on a
    shared file system)."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    import sqlalchemy.exc

    # SQLite: many trial processes report at once; wait for the lock instead of failing at once.
    options = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=options)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Sweeps started at once on a new database (one per machine) all create Optuna's tables; on
            # PostgreSQL one wins and the others fail (duplicate type or table). The tables exist now.
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0.2, 1.0))


def environment(storage: str, study: str, trial_id: int, metric: str, pruner: str) -> dict[str, str]:
    """What the sweep process gives a trial's run (read back below), naming itself as the sweep."""
    return {VARIABLE: json.dumps({"storage": storage, "study": study, "trial_id": trial_id, "metric": metric,
                                  "pruner": pruner, "sweep_pid": os.getpid()})}


def _spec() -> dict[str, Any]:
    """What `environment` gave this process ({} outside a sweep)."""
    return json.loads(os.environ.get(VARIABLE) or "{}")


def follow_the_sweep() -> None:
    """In a trial's run (its launcher, not its tasks): get SIGTERM when the sweep process dies (a kill -9, a
    lost terminal), so the trial saves a checkpoint and exits 138 rather than train on unwatched, and the
    sweep started again resumes it alone."""
    sweep_pid = _spec().get("sweep_pid")
    if sweep_pid is not None:  # None: not a trial, or one of a sweep process older than this code
        from launcher.processes import die_with_parent

        die_with_parent(int(sweep_pid), signal.SIGTERM)


def reporter_from_environment() -> Callable[[dict[str, Any]], bool] | None:
    """The stop-after-epoch hook of a sweep's trial (None outside a sweep)."""
    spec = _spec()
    if not spec:
        return None
    # A sweep process older than this code names no pruner: it built the one Optuna loads by default.
    return Reporter(spec["storage"], spec["study"], int(spec["trial_id"]), spec["metric"], spec.get("pruner"))


class Reporter:
    """Reports an epoch's metric to the trial and says whether the pruner stops it there.

    Every worker of a trial has one (they all take part in agreeing on the answer), but only
    the chief calls it, so only the chief connects to the storage, on its first call.
    """

    def __init__(self, storage: str, study: str, trial_id: int, metric: str, pruner: str | None):
        self.where = (storage, study, trial_id)
        self.metric = metric
        self.pruner = pruner
        self.trial = None

    def _connect(self) -> None:
        import optuna

        storage, study, trial_id = self.where
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.load_study(study_name=study, storage=open_storage(storage),
                                       pruner=make_pruner(self.pruner) if self.pruner else None)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        # FrozenTrial keeps its id private; the sweep passes the id, which Trial() needs.
        frozen = next(trial for trial in self.study.get_trials(deepcopy=False) if trial._trial_id == trial_id)
        self.reported = set(frozen.intermediate_values)  # before a restart

    def __call__(self, entry: dict[str, Any]) -> bool:
        if self.trial is None:
            self._connect()
        epoch = int(entry["epoch"])
        if epoch not in self.reported and entry.get(self.metric) is not None:
            self.trial.report(float(entry[self.metric]), epoch)
            self.reported.add(epoch)
        if not self.trial.should_prune():
            return False
        self.trial.set_user_attr("pruned_at_epoch", epoch)  # the sweep records the trial as pruned
        return True
