"""Command line: flags -> config -> strategy -> train_and_evaluate.

    python -m launcher                               # CPU or all GPUs of this machine
    python -m launcher --gpus 4                      # MirroredStrategy over 4 GPUs
    python -m launcher --job jobs/cpu_smoke.yaml     # offline CPU smoke job (< 3 min)
    python -m launcher --job JOB --set train.epochs=5 data.data_dir=gs://bucket/tfds
    python -m launcher --job JOB --dry_run           # print config, strategy, devices; exit

Exit codes: 0 done; 1 failure (bug, NaN loss); 2 usage, config or environment error
(bad flag or YAML, missing GPUs/TPU/data, bad TF_CONFIG).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from launcher import config as config_lib
from launcher.cluster import read_tf_config
from launcher.errors import EXIT_FAILURE, EXIT_OK, LauncherError

DEFAULT_RUNS_DIR = "runs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launcher",
        description="Train ResNet18 on CIFAR-10 with tf.distribute on a CPU, GPUs, a cluster or a TPU.",
        epilog="Exit codes: 0 success, 1 failure, 2 usage/config/environment error.",
    )
    parser.add_argument("--job", help="YAML job file (see jobs/)")
    parser.add_argument("--workdir", help=f"checkpoints, TensorBoard, summary (default: {DEFAULT_RUNS_DIR}/<job name>)")
    parser.add_argument("--strategy", choices=config_lib.STRATEGIES, help="runtime.strategy (default auto)")
    parser.add_argument("--gpus", type=int, help="runtime.gpus: GPUs of this machine to use (default all)")
    parser.add_argument("--cpu_replicas", type=int, help="runtime.cpu_replicas: split the CPU into N replicas")
    parser.add_argument("--tpu", help='runtime.tpu: TPU name, grpc:// address, or "local" on a TPU VM')
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.epochs=5 data.augmentation=seed")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the resolved config, strategy, devices and replicas; do not train")
    return parser.parse_args(argv)


def dedicated_flags(args: argparse.Namespace) -> dict[str, object]:
    """The flags that override one config key each (applied last)."""
    keys = {"strategy": "runtime.strategy", "gpus": "runtime.gpus",
            "cpu_replicas": "runtime.cpu_replicas", "tpu": "runtime.tpu"}
    return {key: getattr(args, flag) for flag, key in keys.items() if getattr(args, flag) is not None}


def run(args: argparse.Namespace) -> int:
    config = config_lib.build_config(args.job, args.overrides, dedicated_flags(args))
    cluster = read_tf_config()
    workdir = args.workdir or os.path.join(DEFAULT_RUNS_DIR, config.name)

    # TensorFlow is imported only once the config and TF_CONFIG are known to be valid.
    import tensorflow as tf

    from launcher.strategy import describe, make_strategy

    strategy = make_strategy(config.runtime, cluster)
    config_lib.check_batch_divisible(config, strategy.num_replicas_in_sync)
    if args.dry_run:
        print(config_lib.dump(config), end="")
        info = describe(strategy)
        print(f"strategy: {info['strategy']}")
        print(f"num_replicas: {info['num_replicas']}")
        print(f"devices: {', '.join(info['devices'])}")
        if cluster is not None:
            print(f"role: {cluster.task_type} {cluster.task_index} (chief: {cluster.chief_address})")
        print(f"workdir: {workdir}")
        print(f"tensorflow: {tf.__version__}")
        return EXIT_OK

    from resnet18.train import train_and_evaluate

    train_and_evaluate(config, strategy, workdir)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TF's INFO/WARNING start-up noise
    args = parse_args(argv)
    try:
        return run(args)
    except LauncherError as error:
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
