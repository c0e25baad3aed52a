"""What a sweep leaves in its directory: sweep.json, best.yaml, TensorBoard HParams, report/.

- sweep.json, rewritten after every trial ends: the study, the metric, every trial
  (number, params, state, value, per-epoch values, wall time, work directory, error) and
  the best so far. `python -m launcher.status --workdir DIR` reads it.
- best.yaml: the best trial's config, runnable with --job.
- tensorboard/: one HParams session per trial (its params, its metric per epoch), so
  TensorBoard's HParams tab shows the sweep: `tensorboard --logdir DIR/tensorboard`.
- report/: optimization history, parallel coordinates and parameter importances as
  PNGs (Optuna's matplotlib plots), and report.md with the trial table.

    python -c "import json; print(json.load(open('DIR/sweep.json'))['best'])"
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from typing import Any

from resnet18.runtime.files import write_json

SWEEP_FILE = "sweep.json"


def read_summary(workdir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, json.JSONDecodeError):
        return None


def error_line(workdir: str, code: int) -> str:
    """The trial's last `error: ...` line (what the launcher says of a failure), or its exit code."""
    try:
        with open(os.path.join(workdir, "sweep.log"), encoding="utf-8", errors="replace") as stream:
            errors = [line.strip() for line in stream if line.lstrip().startswith("error:")]
    except OSError:
        errors = []
    return (errors[-1] if errors else "no error line") + f" (exit {code})"


def trials(sweep, study) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({"number": trial.number, "params": dict(trial.params), "state": trial.state.name.lower(),
                     "value": trial.value, "values_per_epoch": {str(step): value for step, value
                                                               in sorted(trial.intermediate_values.items())},
                     "wall_seconds": trial.user_attrs.get("wall_seconds"),
                     "workdir": trial.user_attrs.get("workdir", sweep.trial_dir(trial.number)),
                     "machine": trial.user_attrs.get("machine"), "host": trial.user_attrs.get("host"),
                     "error": trial.user_attrs.get("error")})
    return rows


def best(study) -> Any:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if complete else None


def write(sweep, study) -> dict[str, Any]:
    """Writes DIR/sweep.json (atomically); returns what it wrote."""
    leader = best(study)
    content = {"study": sweep.study_name, "storage": sweep.storage, "metric": sweep.args.metric,
               "direction": sweep.direction, "trials_planned": sweep.args.trials,
               "space": {dimension.key: dimension.kind for dimension in sweep.space},
               "trials": trials(sweep, study),
               "best": None if leader is None else {"number": leader.number, "value": leader.value,
                                                    "params": dict(leader.params),
                                                    "workdir": leader.user_attrs.get("workdir")}}
    write_json(os.path.join(sweep.args.workdir, SWEEP_FILE), content)  # sweeps on other machines may share DIR
    return content


def finish(sweep, study) -> dict[str, Any]:
    """best.yaml, the HParams summaries and the report, once this machine's trials are done.

    Other machines sharing the study may still run trials: what is written then is the best of the trials
    complete now, and says so; the last machine to finish (or the same command run again) writes the final one."""
    content = write(sweep, study)
    pending = running_elsewhere(content)
    if content["best"]:
        write_best(sweep, content["best"], pending)
        print(f"Best{' so far' if pending else ''}: trial {content['best']['number']}, {sweep.args.metric} "
              f"{content['best']['value']:.4f}: {content['best']['params']} -> "
              f"{os.path.join(sweep.args.workdir, 'best.yaml')}", flush=True)
    if pending:
        print(f"Not final: {pending}; the last machine to finish writes the final results, or run this command "
              "again once they end", flush=True)
    write_hparams(sweep, content)
    write_report(sweep, study, content)
    return content


def running_elsewhere(content: dict[str, Any]) -> str:
    """The trials still running (on other machines: this one's have ended), as a phrase; "" when none."""
    running = [trial for trial in content["trials"] if trial["state"] == "running"]
    if not running:
        return ""
    return ", ".join(f"trial {trial['number']} ({trial['machine'] or 'unknown machine'})" for trial in running) \
        + (" still runs" if len(running) == 1 else " still run")


def write_best(sweep, best_trial: dict[str, Any], pending: str = "") -> str:
    """DIR/best.yaml: the job with the sweep's --set and the best trial's values, as that trial ran it.

    Built from the study, not copied from the trial's directory, which may be on another machine."""
    from launcher.sweep_space import with_value
    from resnet18 import config as config_lib

    config = with_value(sweep.job, best_trial["params"], f"trial {best_trial['number']}")
    path = os.path.join(sweep.args.workdir, "best.yaml")
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(f"# The best trial ({best_trial['number']}) of sweep {sweep.study_name}: "
                     f"{sweep.args.metric} {best_trial['value']:.4f}\n"
                     + (f"# Not final when written: {pending}\n" if pending else "") + config_lib.dump(config))
    return path


def write_hparams(sweep, content: dict[str, Any]) -> None:
    """DIR/tensorboard: the experiment (its hyperparameters and metric) and one session per trial (its values,
    its metric per epoch, how it ended).

    TensorBoard's HParams protos and record format, as its summary API writes them, without TensorFlow (which
    its summary API and event writer import: seconds, and TensorFlow's log lines in the sweep's output)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    def plugin_summary(tag: str, **data) -> summary_pb2.Summary:
        summary = summary_pb2.Summary()
        summary.value.add(tag=tag, tensor=metadata.NULL_TENSOR, metadata=metadata.create_summary_metadata(
            plugin_data_pb2.HParamsPluginData(**data)))
        return summary

    def write(directory: str, summaries: list[tuple[int, summary_pb2.Summary]]) -> None:
        os.makedirs(directory, exist_ok=True)  # an event file as TensorBoard's EventFileWriter writes it
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        with open(os.path.join(directory, name), "wb") as stream:
            records = RecordWriter(stream)
            records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
            for step, summary in summaries:
                records.write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary).SerializeToString())

    root = os.path.join(sweep.args.workdir, "tensorboard")
    shutil.rmtree(root, ignore_errors=True)  # rewritten whole: a sweep resumed elsewhere adds trials
    experiment = api_pb2.Experiment(
        hparam_infos=[_hparam_info(dimension, api_pb2) for dimension in sweep.space],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=sweep.args.metric))],
        time_created_secs=time.time())
    write(root, [(0, plugin_summary(metadata.EXPERIMENT_TAG, experiment=experiment))])
    dimensions = {dimension.key: dimension for dimension in sweep.space}
    for trial in content["trials"]:
        if not trial["params"] or trial["state"] == "running":
            continue
        name = f"trial-{trial['number']}"
        start = plugin_data_pb2.SessionStartInfo(group_name=name, start_time_secs=time.time())
        for key, value in trial["params"].items():
            if key in dimensions:
                value = _hparam_value(dimensions[key], value)
                field = ("bool_value" if isinstance(value, bool) else
                         "number_value" if isinstance(value, (int, float)) else "string_value")
                setattr(start.hparams[key], field, value)
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_FAILURE if trial["state"] == "fail"
                                             else api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
        scalars = [(int(epoch), summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=sweep.args.metric,
                                                                                     simple_value=value)]))
                   for epoch, value in trial["values_per_epoch"].items()]
        write(os.path.join(root, name), [(0, plugin_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start)),
                                         *scalars,
                                         (0, plugin_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end))])


def _as_text(dimension) -> bool:
    """Whether TensorBoard must see a categorical's choices as text (it takes one type of bool, number or text)."""
    kinds = {type(choice) for choice in dimension.choices}
    return dimension.kind == "categorical" and not (len(kinds) == 1 and kinds <= {bool, int, float, str})


def _hparam_value(dimension, value):
    return str(value) if _as_text(dimension) else value


def _hparam_info(dimension, api_pb2):
    """The hyperparameter's domain, as TensorBoard's HParams tab filters it."""
    info = api_pb2.HParamInfo(name=dimension.key)
    if dimension.kind == "categorical":
        values = [_hparam_value(dimension, choice) for choice in dimension.choices]
        info.type = {bool: api_pb2.DATA_TYPE_BOOL, str: api_pb2.DATA_TYPE_STRING}.get(type(values[0]),
                                                                                      api_pb2.DATA_TYPE_FLOAT64)
        info.domain_discrete.extend(values)  # a protobuf ListValue: bools, numbers or strings
    else:
        info.type = api_pb2.DATA_TYPE_FLOAT64
        info.domain_interval.min_value, info.domain_interval.max_value = float(dimension.low), float(dimension.high)
    return info


def write_report(sweep, study, content: dict[str, Any]) -> list[str]:
    """DIR/report/: history, parallel coordinates, importances (PNG) and report.md."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the plots are "experimental"

    out = os.path.join(sweep.args.workdir, "report")
    os.makedirs(out, exist_ok=True)
    written, notes = [], []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for name, plot, needs in (("optimization_history.png", plots.plot_optimization_history, 1),
                              ("parallel_coordinates.png", plots.plot_parallel_coordinate, 2),
                              ("param_importances.png", plots.plot_param_importances, 2)):
        if len(complete) < needs or (name == "param_importances.png" and len(sweep.space) < 2):
            notes.append(f"{name}: not drawn ({len(complete)} complete trial(s), {len(sweep.space)} parameter(s))")
            continue
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as error:  # Optuna refuses a plot the trials cannot support
            notes.append(f"{name}: not drawn ({error})")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(10, 5.5)
        figure.tight_layout()
        figure.savefig(os.path.join(out, name), dpi=110)
        plt.close(figure)
        written.append(name)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as stream:
        stream.write(_markdown(sweep, content, written, notes))
    return written + ["report.md"]


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown(sweep, content: dict[str, Any], pictures: list[str], notes: list[str]) -> str:
    keys = [dimension.key for dimension in sweep.space]
    lines = [f"# Sweep {content['study']}", "",
             f"{len(content['trials'])} trial(s) of {content['trials_planned']}; metric {content['metric']} "
             f"({content['direction']}); storage {content['storage']}.", ""]
    if pending := running_elsewhere(content):
        lines += [f"Not final when written: {pending}.", ""]
    if content["best"]:
        lines += [f"Best: trial {content['best']['number']}, {content['metric']} {content['best']['value']:.4f}, "
                  + ", ".join(f"{key}={_shown(value)}" for key, value in content["best"]["params"].items())
                  + " (its config: best.yaml).", ""]
    lines += [f"![{name}]({name})" for name in pictures] + [""] + [f"- {note}" for note in notes] + [""]
    lines += ["| trial | state | " + " | ".join(keys) + f" | {content['metric']} | epochs | wall s |",
              "|---" * (len(keys) + 5) + "|"]
    for trial in content["trials"]:
        value = "" if trial["value"] is None else f"{trial['value']:.4f}"
        wall = "" if trial["wall_seconds"] is None else f"{trial['wall_seconds']:.0f}"
        lines.append(f"| {trial['number']} | {trial['state']} | "
                     + " | ".join(_shown(trial["params"].get(key, "")) for key in keys)
                     + f" | {value} | {len(trial['values_per_epoch'])} | {wall} |")
    return "\n".join(lines) + "\n"
