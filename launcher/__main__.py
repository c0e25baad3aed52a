"""Command line: flags -> config -> strategy -> train_and_evaluate -> report.

    python -m launcher                               # CPU or all GPUs of this machine
    python -m launcher --gpus 4                      # MirroredStrategy over 4 GPUs
    python -m launcher --job jobs/cpu_smoke.yaml     # offline CPU smoke job
    python -m launcher --job JOB --set train.epochs=5 data.data_dir=gs://bucket/tfds
    python -m launcher --job JOB --dry_run           # print config, strategy, devices; exit
    python -m launcher --workers 2 --job JOB         # 2 local worker processes (MultiWorkerMirrored)

This module is the only one that parses the command line. Exit codes: 0 done;
1 failure a restart would not fix (bug, NaN loss, out of memory); 2 usage, config
or environment error (bad flag or YAML, missing GPUs/TPU/data, bad TF_CONFIG);
138 retryable: preempted (SIGTERM, checkpoint saved) or lost a peer; 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import traceback

from launcher import cpu_environment, isolation, local_workers, processes, sweep_trial
from launcher.flags import FlagError, FlagParser, integer, nonempty, positive_seconds, work_directory
from launcher.cluster import ClusterSpec, cluster_address, read_tf_config
from launcher.plan import STRATEGY_CLASSES, Plan, describe
from launcher.slurm import tf_config_from_slurm
from launcher.storage import mapped_storage_errors
from resnet18 import config as config_lib
from resnet18 import tasks
from resnet18.runtime.files import DEFAULT_RUNS_DIR
from resnet18.runtime.preemption import evaluator_stopped, preempted_before_training
from resnet18.runtime.errors import (EXIT_FAILURE, EXIT_OK, PEER_LOSS_WORDS, ConfigError, LauncherError, PortInUseError,
                                     PreemptedBeforeTraining, RetryableError, SetupError, TrainingError, first_line,
                                     lost_a_peer)



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = FlagParser(
        prog="python -m launcher",
        description="Train ResNet18 on CIFAR-10 with tf.distribute on a CPU, GPUs, a cluster or a TPU.",
        epilog="Exit codes: 0 success, 1 failure, 2 usage/config/environment error, "
               "138 retryable (preempted or peer lost), 130 interrupted.",
    )
    parser.add_argument("--job", type=nonempty, help="YAML job file (see jobs/)")
    parser.add_argument("--workdir", type=work_directory,
                        help=f"checkpoints, TensorBoard, summary (default: {DEFAULT_RUNS_DIR}/<job name>)")
    parser.add_argument("--strategy", choices=config_lib.choices(config_lib.RuntimeConfig, "strategy"),
                        help="runtime.strategy (default auto)")
    parser.add_argument("--gpus", type=integer(0), help="runtime.gpus: GPUs of this machine to use (default all)")
    parser.add_argument("--cpu_replicas", type=integer(1), help="runtime.cpu_replicas: split the CPU into N replicas")
    parser.add_argument("--tpu", type=nonempty, help='runtime.tpu: TPU name, grpc:// address, or "local" on a TPU VM')
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.epochs=5 data.augmentation=none")
    parser.add_argument("--workers", type=integer(1),
                        help="start N local worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy)")
    parser.add_argument("--gpus_per_worker", type=integer(0),
                        help="with --workers: GPUs of this host per worker "
                             "(0 = CPU only; default: the visible GPUs split evenly)")
    parser.add_argument("--max_restarts", type=integer(0), default=0,
                        help="with --workers: restart the whole group up to N times after a retryable failure")
    parser.add_argument("--min_workers", type=integer(1),
                        help="with --workers: go on with fewer workers, down to this many, when a worker slot "
                             "keeps failing (default: --workers, i.e. never fewer)")
    parser.add_argument("--preemption_grace", type=positive_seconds, default=None,
                        help="with --workers: seconds every worker gets to finish its checkpoint after a "
                             "preemption before it is killed (default 60)")
    parser.add_argument("--frozen_after", type=positive_seconds, default=None,
                        help="with --workers: a task that shows no sign of life this many seconds (a stopped or "
                             "deadlocked process) is killed and blamed, and the group restarts (default "
                             f"{processes.FROZEN_SECONDS:g}; more than {processes.ALIVE_STALE_SECONDS:g})")
    parser.add_argument("--log_workers", type=console_selection, default="all",
                        help="with --workers: tasks whose output the console shows: all (default), or a list "
                             "such as 0 or 0,2 or evaluator; every task's output goes to WORKDIR/logs/ anyway")
    parser.add_argument("--evaluator", action="store_true",
                        help="with --workers: also run a sidecar evaluator task (train.evaluation: sidecar)")
    parser.add_argument("--worker_network", choices=isolation.MODES, default="auto",
                        help="with --workers: private runs the group in a network namespace of its own, where "
                             "nothing outside it reaches the workers' unauthenticated servers; host leaves them on "
                             "the host's network; auto (default): private where it can be made, else host")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the resolved config, strategy, devices and replicas; do not train")
    return parser.parse_args(argv)


# The flags that set one config key each (applied after --job and --set).
FLAG_KEYS = {"strategy": "runtime.strategy", "gpus": "runtime.gpus", "cpu_replicas": "runtime.cpu_replicas",
             "tpu": "runtime.tpu"}


def dedicated_flags(args: argparse.Namespace) -> dict[str, object]:
    """The flags that override one config key each (applied last)."""
    flags = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    if args.workers is not None:
        flags["runtime.strategy"] = "multi_worker"
    if args.evaluator:
        flags["train.evaluation"] = "sidecar"
    return flags


def config_of(args: argparse.Namespace) -> config_lib.Config:
    """The job with --set and the dedicated flags applied, checked (ConfigError naming the flag that set a key)."""
    try:
        return tasks.check(config_lib.build_config(args.job, args.overrides, dedicated_flags(args)))
    except ConfigError as error:  # a key a flag set is named with the flag, which is what the user typed
        named = [f"{key} is --{flag}" for flag, key in FLAG_KEYS.items()
                 if getattr(args, flag) is not None and key in str(error)]
        raise (type(error)(f"{error} ({', '.join(named)})") if named else error) from None


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    # Until training starts there is nothing to save: SIGTERM exits 138 at once, not by its default action
    # (143, leaving a child such as launcher.prepare running). --workers' supervisor takes over once it runs.
    signal.signal(signal.SIGTERM, preempted_before_training)
    check_flag_combinations(args)
    config = config_of(args)
    workdir = args.workdir or os.path.join(DEFAULT_RUNS_DIR, config.name)
    if args.workers is not None:
        return run_local_workers(config, workdir, args, sys.argv[1:] if argv is None else argv)
    cluster = _cluster_from_environment()
    if cluster is not None and not args.dry_run and not os.environ.get(processes.PARENT_PID_VARIABLE):
        from launcher.task_log import tee_output

        tee_output(os.path.join(workdir, "logs", f"{cluster.task_type}-{cluster.task_index}.log"),
                   f"TF_CONFIG {os.environ.get('TF_CONFIG', '')}")
    from launcher.strategy import resolve_strategy_name

    if cluster is not None and cluster.is_evaluator:
        return run_evaluator_task(config, workdir, cluster, args.dry_run)
    if cluster is not None and cluster.num_tasks > 1:
        # Decided without TensorFlow: a dry run must not start a server that waits for the other tasks.
        name = resolve_strategy_name(config.runtime, cluster, gpus_found=0)
        plan = Plan(config, workdir, STRATEGY_CLASSES[name], cluster)
        if args.dry_run:
            return _print_dry_run(plan)

    # TensorFlow is imported only once the config and TF_CONFIG are known to be valid.
    import tensorflow as tf

    from launcher.strategy import make_strategy
    from resnet18.runtime.topology import describe as describe_strategy
    from resnet18.runtime.topology import topology_of

    with mapped_tensorflow_errors(tf), processes.waiting_for_group():
        strategy = make_strategy(config.runtime, cluster)
    config_lib.check_batch_divisible(config, strategy.num_replicas_in_sync)
    info = describe_strategy(strategy)
    plan = Plan(config, workdir, info["strategy"], cluster, num_replicas=info["num_replicas"],
                devices=tuple(info["devices"]), started=True)
    if args.dry_run:
        from resnet18.runtime.hardware import cpu_kernels
        from resnet18.training.loop import settle_config

        print(f"tensorflow: {tf.__version__} (CPU kernels: {cpu_kernels()})")
        code = _print_dry_run(plan)
        with mapped_tensorflow_errors(tf), mapped_storage_errors(workdir):
            settle_config(config, strategy, workdir)  # what the run refuses before it trains (precision, resume)
        return code
    chief = topology_of(strategy).is_chief
    if chief:
        print(describe(plan), flush=True)

    from resnet18.training.loop import train_and_evaluate

    batch = (config.train.global_batch_size, strategy.num_replicas_in_sync, config.train.grad_accum_steps)
    with mapped_tensorflow_errors(tf, batch), mapped_storage_errors(workdir):
        train_and_evaluate(config, strategy, workdir, stop_after_epoch=sweep_trial.reporter_from_environment())
    if chief and config.train.evaluation == "inline":  # with a sidecar, the evaluator writes it when done
        _write_report(workdir)
    return EXIT_OK


def run_evaluator_task(config: config_lib.Config, workdir: str, cluster: ClusterSpec, dry_run: bool) -> int:
    """The sidecar evaluator task: one device, no collectives; evaluates the chief's checkpoints."""
    if config.train.evaluation != "sidecar":
        raise ConfigError("this task is the evaluator (TF_CONFIG task type evaluator) but train.evaluation is "
                          "inline, so every worker evaluates already; set train.evaluation: sidecar")
    plan = Plan(config, workdir, STRATEGY_CLASSES["one_device"], cluster, started=not dry_run)
    if dry_run:
        return _print_dry_run(plan)
    signal.signal(signal.SIGTERM, evaluator_stopped)  # the group stops it so whenever the group stops
    import tensorflow as tf

    from launcher.strategy import make_strategy
    from resnet18.training.evaluator import run_evaluator

    print(describe(plan), flush=True)
    one_device = dataclasses.replace(config.runtime, strategy="one_device", gpus=None,
                                     cpu_replicas=0)
    with mapped_tensorflow_errors(tf), mapped_storage_errors(workdir):
        run_evaluator(config, make_strategy(one_device, None), workdir)
    _write_report(workdir)
    return EXIT_OK


def _cluster_from_environment() -> ClusterSpec | None:
    """TF_CONFIG as set by the cluster system, or built from Slurm's variables."""
    cluster = read_tf_config()
    if cluster is None and (slurm_tf_config := tf_config_from_slurm(os.environ)):
        os.environ["TF_CONFIG"] = slurm_tf_config  # MultiWorkerMirroredStrategy reads it from here
        cluster = read_tf_config()
        print(f"TF_CONFIG from Slurm: {slurm_tf_config}", flush=True)
    return cluster


def _print_dry_run(plan: Plan) -> int:
    print(config_lib.dump(plan.config), end="")
    print(describe(plan), flush=True)
    return EXIT_OK


class _ReportStopped(BaseException):
    """SIGTERM while the report is written: a BaseException, as no library's `except Exception` may keep it."""


def _stop_the_report(signum=None, frame=None) -> None:  # noqa: ARG001 - signal handler signature
    raise _ReportStopped()


def _write_report(workdir: str) -> None:
    # Training is complete and saved: a SIGTERM now stops the report only. It is no preemption (138, "before
    # training started", had the cluster restart a finished run); the run exits 0.
    signal.signal(signal.SIGTERM, _stop_the_report)
    try:
        from launcher.report import write_report

        write_report(workdir)
    except _ReportStopped:
        print(f"SIGTERM while writing the report: training is complete; exiting 0 (write the report with python -m "
              f"launcher.report --workdir {workdir})", flush=True)
    except Exception as error:  # the run itself succeeded; say so and how to retry
        print(f"warning: the report failed ({first_line(error)}); run python -m launcher.report --workdir {workdir}",
              flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the exit code is decided: 0 (main() says why SIG_IGN)


@contextlib.contextmanager
def mapped_tensorflow_errors(tf, batch: tuple[int, int, int] | None = None):
    """Maps TensorFlow's failures to the launcher's exit codes.

    A lost or frozen peer surfaces as Unavailable/DeadlineExceeded/Cancelled (collectives aborted,
    coordination-service heartbeat missed), or as Aborted naming a collective or a peer: retryable
    (138), so the cluster restarts every worker and they resume. An Aborted that names neither is an
    op that could not run here (oneDNN could not build a kernel, say): a restart would fail alike (1).
    Out of memory is not retryable either; it names where memory ran out and, given `batch` (global batch,
    replicas, gradient accumulation steps), the batch each replica holds: what the user can lower.
    """
    try:
        yield
    except (tf.errors.AbortedError, tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError) as error:
        if not lost_a_peer(error):
            raise TrainingError(f"TensorFlow aborted an op ({first_line(error)}); a restart would not help") from None
        raise _peer_lost(error) from None
    except tf.errors.UnknownError as error:
        if "Could not start gRPC server" not in str(error):
            raise
        address = cluster_address()
        raise PortInUseError(f"could not listen on {address} (this task's address in TF_CONFIG): the port is in use "
                             "by another process") from None
    except tf.errors.ResourceExhaustedError as error:
        raise TrainingError(out_of_memory(error, batch)) from None


def out_of_memory(error: Exception, batch: tuple[int, int, int] | None) -> str:
    """The out-of-memory message: where (device and allocator, as TensorFlow names them), each replica's batch."""
    text = str(error)
    device, allocator = re.search(r"device:(\w+:\d+)", text), re.search(r"by allocator (\S+)", text)
    where = (f"on {device.group(1)}" + (f" (allocator {allocator.group(1)})" if allocator else "")
             if device else "on a device it does not name")
    holds = ""
    if batch:
        global_batch, replicas, accumulation = batch
        holds = (f"; each replica holds a batch of {global_batch // replicas} (train.global_batch_size "
                 f"{global_batch} over {replicas} replica{'s' if replicas > 1 else ''})")
        if accumulation > 1:
            holds += f", {global_batch // replicas // accumulation} at a time (train.grad_accum_steps {accumulation})"
    return (f"out of memory {where} ({first_line(error)}){holds}; lower train.global_batch_size, raise "
            "train.grad_accum_steps or use more devices")


def _peer_lost(error: Exception) -> RetryableError:
    return RetryableError(
        f"lost contact with another worker ({type(error).__name__}: {first_line(error, PEER_LOSS_WORDS)}); "
        "restart every worker to resume from the last checkpoint")


def local_worker_layout(config: config_lib.Config, args: argparse.Namespace, visible: list[str] | None = None
                        ) -> tuple[list[str | None], int]:
    """`--workers N`: each worker's GPUs (of `visible`, default this host's) and its number of replicas, once N
    workers are known to be able to split the batch (ConfigError naming the key)."""
    if config.runtime.cpu_replicas > 1:
        raise ConfigError("with --workers each worker has one CPU replica; drop --cpu_replicas (or set it to 1)")
    gpus = processes.gpu_slices(args.workers, args.gpus_per_worker,
                                processes.visible_gpu_ids() if visible is None else visible)
    replicas_per_worker = max(1, len((gpus[0] or "").split(","))) if gpus[0] else 1
    config_lib.check_batch_divisible(config, args.workers * replicas_per_worker)
    return gpus, replicas_per_worker


def run_local_workers(config: config_lib.Config, workdir: str, args: argparse.Namespace, argv: list[str]) -> int:
    """`--workers N`: validate once here, then start N workers sharing one resolved config (in a private
    network namespace where one can be made: this launcher runs again inside it, with the same `argv`)."""
    if "://" in workdir:
        raise FlagError(f"--workdir {workdir}: --workers keeps its workers' logs, liveness files and job file in "
                        "the work directory, which must be a local or mounted path (object-store work "
                        "directories are for cluster runs, whose TF_CONFIG the cluster gives)")
    min_workers = args.workers if args.min_workers is None else args.min_workers
    gpus, replicas_per_worker = local_worker_layout(config, args)

    def check_workers(count: int) -> None:  # fewer workers, after an elastic shrink
        config_lib.check_batch_divisible(config, count * replicas_per_worker)

    inside = os.environ.get(isolation.INSIDE_VARIABLE)
    network = (isolation.Decision(True, "a network namespace of its own") if inside
               else isolation.decide(args.worker_network, config, workdir))
    if args.dry_run:
        return _print_dry_run(Plan(config, workdir, STRATEGY_CLASSES["multi_worker"], local_workers=args.workers,
                                   gpus=tuple(gpus), num_replicas=args.workers * replicas_per_worker,
                                   evaluator=args.evaluator, min_workers=min_workers, network=network.describe()))
    if not inside:
        print(network.describe(), flush=True)
    if inside:
        processes.die_with_parent(int(inside))
        isolation.bring_up_loopback()
    elif network.private:
        _prepare_data_outside(config, workdir)
        return isolation.run_inside(network, argv)
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="launch_", dir=workdir, delete=False) as stream:
        stream.write(config_lib.dump(config))
    try:
        return local_workers.launch(local_workers.GroupSpec(
            worker_args=("--job", stream.name, "--workdir", workdir), workers=args.workers, min_workers=min_workers,
            gpus_per_worker=args.gpus_per_worker, evaluator=args.evaluator, log_dir=os.path.join(workdir, "logs"),
            workdir=workdir,
            console=args.log_workers, max_restarts=args.max_restarts,
            preemption_grace=local_workers.DEFAULT_PREEMPTION_GRACE_SECONDS if args.preemption_grace is None
            else args.preemption_grace, check_workers=check_workers,
            frozen_after=processes.FROZEN_SECONDS if args.frozen_after is None else args.frozen_after,
            evaluator_silence=_evaluator_silence(config.train.step_timeout_seconds),
            global_batch=config.train.global_batch_size, replicas_per_worker=replicas_per_worker))
    finally:
        os.unlink(stream.name)


def _prepare_data_outside(config: config_lib.Config, workdir: str) -> None:
    """Prepares a TFDS data set (which may need a download) before the group enters its private network."""
    if config.data.source != "tfds":
        return  # the stand-in and image folders are local
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="prepare_", dir=workdir, delete=False) as stream:
        stream.write(config_lib.dump(config))
    try:
        result = subprocess.run([sys.executable, "-m", "launcher.prepare", "--job", stream.name, "--workdir", workdir])
    finally:
        os.unlink(stream.name)
    if result.returncode:
        raise SetupError(f"the data set could not be prepared before the workers' private network started (exit "
                         f"{result.returncode}, above); prepare it with python -m launcher.prepare, or use "
                         "--worker_network host")


def _evaluator_silence(step_timeout: float) -> float | None:
    """Once training is done, how long the evaluator may print nothing: each evaluation is bounded by its
    watchdog (train.step_timeout_seconds), plus what its first (compiling) one and its final wait may take."""
    return step_timeout + local_workers.EVALUATOR_ALLOWANCE_SECONDS if step_timeout else None


def console_selection(text: str) -> frozenset[str] | None:
    """--log_workers: all -> None; "0,2,evaluator" -> {"worker 0", "worker 2", "evaluator"}."""
    if text.strip() == "all":
        return None
    names = set()
    for item in (part.strip() for part in text.split(",")):
        if item == "evaluator":
            names.add("evaluator")
        elif item.isdigit():
            names.add(f"worker {int(item)}")
        else:
            raise argparse.ArgumentTypeError(f"expected all, or worker ranks and/or evaluator such as 0,2, "
                                             f"got {text!r}")
    return frozenset(names)


def check_flag_combinations(args: argparse.Namespace) -> None:
    """Flags that cannot go together (FlagError naming them), before the job is read."""
    if args.workers is None:
        only_with_workers = {"--gpus_per_worker": args.gpus_per_worker is not None,
                             "--max_restarts": args.max_restarts, "--min_workers": args.min_workers is not None,
                             "--evaluator": args.evaluator, "--preemption_grace": args.preemption_grace is not None,
                             "--frozen_after": args.frozen_after is not None,
                             "--log_workers": args.log_workers is not None,
                             "--worker_network": args.worker_network != "auto"}
        given = [flag for flag, used in only_with_workers.items() if used]
        if given:
            raise FlagError(f"{', '.join(given)} go(es) with --workers N")
        return
    others = {"--strategy": args.strategy not in (None, "multi_worker"), "--tpu": args.tpu is not None,
              "--gpus": args.gpus is not None, "--cpu_replicas": args.cpu_replicas not in (None, 1)}
    given = [flag for flag, used in others.items() if used]
    if given:
        raise FlagError(f"{', '.join(given)} cannot go with --workers {args.workers}, which runs "
                        "MultiWorkerMirroredStrategy with one replica per worker (or --gpus_per_worker GPUs each)")
    if args.frozen_after is not None and args.frozen_after <= processes.ALIVE_STALE_SECONDS:
        raise FlagError(f"--frozen_after must be more than {processes.ALIVE_STALE_SECONDS:g} seconds: a healthy "
                        "task's liveness file can be that old while TensorFlow keeps it busy; "
                        f"got {args.frozen_after:g}")
    if args.min_workers is not None and args.min_workers > args.workers:
        raise FlagError(f"--min_workers must be between 1 and --workers {args.workers}, got {args.min_workers}")
    shrink_after = local_workers.SHRINK_AFTER  # failed starts in a row that drop a slot: restarts it takes
    if args.min_workers is not None and args.min_workers < args.workers and args.max_restarts < shrink_after:
        raise FlagError(f"--min_workers drops a worker after {shrink_after} failed starts in a row: it needs "
                        f"--max_restarts {shrink_after} or more, got {args.max_restarts}")
    for name in sorted(args.log_workers or ()):
        if name == "evaluator" and not args.evaluator:
            raise FlagError("--log_workers names the evaluator, which runs only with --evaluator")
        if name.startswith("worker ") and int(name.split()[1]) >= args.workers:
            raise FlagError(f"--log_workers names {name}; --workers {args.workers} has workers 0 to "
                            f"{args.workers - 1}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TF's INFO/WARNING start-up noise
    cpu_environment.apply()  # read by TensorFlow at import: set before it is imported
    if parent := os.environ.get(processes.PARENT_PID_VARIABLE):  # a task of `--workers N`
        processes.die_with_parent(int(parent))
    elif not os.environ.get(isolation.INSIDE_VARIABLE):  # a sweep's trial: its outermost launcher
        sweep_trial.follow_the_sweep()
    if alive := os.environ.get(processes.ALIVE_FILE_VARIABLE):
        processes.keep_alive(alive)
    try:
        try:
            return run(parse_args(argv), argv)
        finally:
            # The exit code is decided. A SIGTERM from now on (a second notice; srun ending the step once a peer
            # exited 138) must not turn it into a traceback or, once Python resets its handlers to the default
            # action as it finalizes, into death by the signal (143) while TensorFlow tears down. SIG_IGN is
            # the one disposition finalization leaves alone; SIGKILL still ends a teardown that hangs.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (LauncherError, PreemptedBeforeTraining) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:  # anything else is a bug or a TensorFlow failure: show it whole
        traceback.print_exc()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
