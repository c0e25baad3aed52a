"""A run's (or a sweep's) state at a glance, from what is on disk: `python -m launcher.status --workdir DIR`.

Works while the run goes on, after it finished or crashed, and on a shared work
directory (gs:// included): it only reads WORKDIR/config.yaml, status.json (the
chief's heartbeat), events.jsonl (starts, ends, failures and restarts with their
causes), history.jsonl, summary.json and the checkpoint files. It prints the state
(running, finished, stopped early, preempted, failed, lost a peer, restarting, stalled), step and epoch, the
last checkpoint and its age, images/s over the last training calls, the last
evaluation and the restarts so far; `--json` prints the same as one JSON object.

    python -m launcher.status --workdir runs/cpu_smoke
    watch -n 10 python -m launcher.status --workdir gs://bucket/runs/big

Exit codes: 0 printed; 2 the directory holds no run.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from typing import Any

from launcher.flags import FlagParser, run_directory
from resnet18 import config as config_lib
from resnet18.runtime.checkpoint_files import EPOCHS_DIR, EPOCHS_KEPT_FOR_EVALUATOR, checkpoint_candidates
from resnet18.runtime.errors import EXIT_OK, EXIT_PORT_IN_USE, LauncherError, SetupError
from resnet18.runtime.files import modified_seconds, read_json, read_text
from resnet18.runtime.history import read_history
from resnet18.runtime.status import FINISHED_STATES, heartbeat_allowance, read_events, read_status


def collect(workdir: str, now: float | None = None) -> dict[str, Any]:
    """Everything the status says, as data."""
    now = time.time() if now is None else now
    path = os.path.join(workdir, "config.yaml")
    text = read_text(path)
    if text is None:
        raise SetupError(f"{workdir} holds no run (no config.yaml)")
    config = config_lib.from_yaml_text(text, path)  # a damaged one: ConfigError naming it (exit 2)
    status = read_status(workdir) or {}
    events = read_events(workdir)
    history = read_history(workdir, warn=False)
    summary = read_json(os.path.join(workdir, "summary.json"))
    checkpoints = checkpoint_candidates(os.path.join(workdir, "checkpoints"))
    timeout = config.train.step_timeout_seconds
    result: dict[str, Any] = {"workdir": workdir, "state": _state(status, summary, events, now, timeout),
                              "step": status.get("step"), "total_steps": status.get("total_steps"),
                              "epoch": status.get("epoch"), "images_per_sec": status.get("images_per_sec"),
                              "heartbeat_age_seconds": now - status["updated"] if status.get("updated") else None}
    if checkpoints:
        newest = checkpoints[0]
        result["last_checkpoint"] = {"path": newest, "step": int(newest.rsplit("-", 1)[1]),
                                     "age_seconds": now - modified_seconds(newest + ".index")}
    evaluated = [entry for entry in history if "test_accuracy" in entry]
    if evaluated:
        result["last_evaluation"] = {key: evaluated[-1].get(key) for key in ("epoch", "step", "test_accuracy",
                                                                             "test_loss")}
    if config.train.evaluation == "sidecar":  # epochs the chief keeps until an evaluator has taken them
        result["awaiting_evaluator"] = len(checkpoint_candidates(os.path.join(workdir, EPOCHS_DIR)))
        result["awaiting_evaluator_kept_at_most"] = EPOCHS_KEPT_FOR_EVALUATOR
    result["restarts"] = _restarts(events)
    if summary:
        result["final"] = {key: summary.get(key) for key in ("test_accuracy", "test_loss", "steps",
                                                              "stopped_early_after_epoch", "wall_seconds")}
    return result


def _state(status: dict[str, Any], summary: dict[str, Any] | None, events: list[dict[str, Any]], now: float,
           step_timeout: float) -> str:
    """The run's state; a running chief is stalled when its heartbeat is older than its own watchdog allows."""
    state = status.get("state")
    # The --workers launcher's newest word (a restarted evaluator adds its own events before the chief writes).
    last = next((event for event in reversed(events) if event.get("event", "").startswith("group_")), {})
    if state in FINISHED_STATES or (summary and not state):
        ended = "stopped early" if (state == "stopped_early" or (summary or {}).get("stopped_early_after_epoch")) \
            else "finished"
        if last.get("event") == "group_done" and last.get("evaluator_failed"):  # the --workers launcher's word
            return (f"{ended}, but the evaluator did not (exit {last.get('exit_code')}: "
                    f"{last['evaluator_failed']}); run the same command again to evaluate the epochs it left")
        return ended
    if state in ("preempted", "failed", "lost_peer"):
        ended = "lost a peer" if state == "lost_peer" else state
        if last.get("event") == "group_start" and last.get("time", 0) >= status.get("updated", now):
            return f"restarting (the last attempt's chief: {ended})"  # the chief writes again once it has started
        return ended
    if state in ("training", "starting", "compiling"):
        if last.get("event") == "group_failed" and last.get("time", 0) >= status.get("updated", now):
            return "failed"  # the launcher stopped the group after the chief last wrote (killed, it never wrote)
        age = now - status.get("updated", now)
        allowance = heartbeat_allowance(step_timeout, state)
        if allowance is None or age <= allowance:
            return "running"
        plus = "the heartbeat interval" if state == "training" else "the start-up allowance (it was compiling)"
        return (f"stalled or gone (no heartbeat for {age:.0f} s; its watchdog allows {allowance:.0f} s: "
                f"train.step_timeout_seconds and {plus})")
    return {"group_failed": "failed", "group_start": "starting"}.get(last.get("event"), "unknown (no heartbeat yet)")


def _restarts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every start after the first, with why the one before ended. A start is a --workers group's start (its
    chief's training start, if it got that far, says the step) or a training start outside such a group."""
    found, previous_end = [], None
    current: dict[str, Any] | None = None  # the latest start
    claimable = False  # it is a group start whose chief has not started training yet
    for event in events:
        kind = event.get("event")
        if kind in ("train_end", "group_failed"):
            previous_end, claimable = event, False
        elif kind == "group_start" and current is not None and _port_retry(event, previous_end):
            previous_end, claimable = None, True  # the same start on new ports (the launcher counts none)
        elif kind == "group_start" or (kind == "train_start" and not claimable):
            entry = {"time": event["time"], "step": event.get("step"), "cause": _cause(previous_end)}
            if current is not None:
                found.append(entry)
            current, previous_end, claimable = entry, None, kind == "group_start"
        if kind == "train_start":
            claimable = False
            current["step"] = event.get("step")
            if event.get("skipped_checkpoints"):  # the newest checkpoint(s) could not be read
                current["cause"] = f"{current['cause']}; then skipped {'; '.join(event['skipped_checkpoints'])}"
    return found


def _port_retry(start: dict[str, Any], end: dict[str, Any] | None) -> bool:
    """A group start by the launcher itself (attempt > 0) after a worker's port was taken (exit 98)."""
    return bool(start.get("attempt")) and bool(end) and end.get("event") == "group_failed" \
        and end.get("exit_code") == EXIT_PORT_IN_USE


def _cause(end: dict[str, Any] | None) -> str:
    """Why a start ended, from its last word (train_end or group_failed)."""
    if not end:
        return "unknown (killed without a word)"
    cause = end.get("cause") or f"{end.get('state')}: {end.get('detail', '')}"
    if end.get("error"):  # what the blamed task said
        cause = f"{cause.strip(': ')}: {end['error']}"
    return cause.strip(": ")


def render(result: dict[str, Any]) -> str:
    def ago(seconds: float | None) -> str:
        return "?" if seconds is None else f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"

    lines = [f"{result['workdir']}: {result['state']}"]
    if result.get("step") is not None:
        lines.append(f"  step {result['step']}/{result['total_steps']} (epoch {result['epoch']}), heartbeat "
                     f"{ago(result['heartbeat_age_seconds'])}"
                     + (f", {result['images_per_sec']:.0f} images/s over the last calls"
                        if result.get("images_per_sec") else ""))
    if "last_checkpoint" in result:
        checkpoint = result["last_checkpoint"]
        lines.append(f"  last checkpoint: step {checkpoint['step']}, written {ago(checkpoint['age_seconds'])} "
                     f"({checkpoint['path']})")
    if "last_evaluation" in result:
        evaluation = result["last_evaluation"]
        lines.append(f"  last evaluation: epoch {evaluation['epoch']}: test_accuracy {evaluation['test_accuracy']:.4f}"
                     + (f", test_loss {evaluation['test_loss']:.4f}" if evaluation.get("test_loss") is not None
                        else ""))
    if result.get("awaiting_evaluator"):
        lines.append(f"  epochs awaiting the sidecar evaluator: {result['awaiting_evaluator']} (the chief keeps "
                     f"at most {result['awaiting_evaluator_kept_at_most']}; an evaluator further behind misses the "
                     "oldest)")
    lines.append(f"  restarts: {len(result['restarts'])}")
    for restart in result["restarts"]:
        when = datetime.datetime.fromtimestamp(restart["time"]).isoformat(timespec="seconds")
        lines.append(f"    {when} at step {restart['step']}: after {restart['cause']}")
    if "final" in result and result["final"].get("test_accuracy") is not None:
        final = result["final"]
        lines.append(f"  final: test_accuracy {final['test_accuracy']:.4f} after {final['steps']} steps"
                     + (f" (stopped early after epoch {final['stopped_early_after_epoch']})"
                        if final.get("stopped_early_after_epoch") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = FlagParser(prog="python -m launcher.status", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=run_directory, help="a run's or a sweep's work directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    try:
        args = parser.parse_args(argv)
        sweep = os.path.exists(os.path.join(args.workdir, "sweep.json"))
        result = collect_sweep(args.workdir) if sweep else collect(args.workdir)
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps(result, indent=2) if args.json else (render_sweep(result) if sweep else render(result)))
    return EXIT_OK


def collect_sweep(workdir: str, now: float | None = None) -> dict[str, Any]:
    """A sweep's state from its sweep.json, and every running trial's own status."""
    with open(os.path.join(workdir, "sweep.json"), encoding="utf-8") as stream:
        sweep = json.load(stream)
    states: dict[str, int] = {}
    for trial in sweep["trials"]:
        states[trial["state"]] = states.get(trial["state"], 0) + 1
    running = []
    for trial in sweep["trials"]:
        if trial["state"] == "running" and os.path.exists(os.path.join(trial["workdir"], "config.yaml")):
            running.append({"number": trial["number"], "params": trial["params"],
                            **{key: value for key, value in collect(trial["workdir"], now).items()
                               if key in ("state", "step", "total_steps", "epoch", "images_per_sec")}})
    return {"workdir": workdir, "sweep": sweep["study"], "metric": sweep["metric"], "direction": sweep["direction"],
            "trials_planned": sweep["trials_planned"], "trials": states, "best": sweep["best"], "running": running}


def render_sweep(result: dict[str, Any]) -> str:
    states = ", ".join(f"{count} {state}" for state, count in sorted(result["trials"].items())) or "none yet"
    lines = [f"{result['workdir']}: sweep {result['sweep']}: {sum(result['trials'].values())} of "
             f"{result['trials_planned']} trials ({states}); {result['metric']} ({result['direction']})"]
    best = result["best"]
    if best:
        params = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in best["params"].items())
        lines.append(f"  best so far: trial {best['number']}, {result['metric']} {best['value']:.4f} ({params})")
    for trial in result["running"]:
        lines.append(f"  running: trial {trial['number']}: {trial['state']}, step {trial['step']}/"
                     f"{trial['total_steps']} (epoch {trial['epoch']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
