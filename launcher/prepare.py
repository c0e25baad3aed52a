"""Prepare the data set a job names, where there is network: `python -m launcher.prepare --job JOB`.

Downloads and prepares CIFAR-10 (or any TFDS data set `data.dataset` names) into
`data.data_dir` as ArrayRecord files, or generates the offline stand-in, exactly as a
run would on its first start. For machines where training has no network: a cluster's
compute nodes (run this on the login node, into the shared `data.data_dir`), and the
private network a local `--workers N` group runs in (the launcher runs this outside it
first).

    python -m launcher.prepare --job jobs/cifar10_multiworker.yaml --set data.data_dir=/shared/tfds

Exit codes: 0 prepared (or already there); 2 bad job or flags, or the data cannot be had.
"""

from __future__ import annotations

import os
import sys

from launcher.flags import FlagParser, nonempty, work_directory
from resnet18 import config as config_lib
from resnet18.runtime.errors import EXIT_OK, LauncherError
from resnet18.runtime.files import DEFAULT_RUNS_DIR


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = FlagParser(prog="python -m launcher.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=nonempty, help="YAML job file (see jobs/)")
    parser.add_argument("--workdir", type=work_directory,
                        help="the run's work directory, where the stand-in goes when data.data_dir is not set "
                             "(default: the launcher's, runs/NAME)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set data.data_dir=/shared/tfds")
    try:
        args = parser.parse_args(argv)
        config = config_lib.build_config(args.job, args.overrides)
        from resnet18.data.sources import prepare_source

        source = prepare_source(config.data, args.workdir or os.path.join(DEFAULT_RUNS_DIR, config.name))
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    print(f"Prepared {source.name}: {source.num_train} training and {source.num_test} test examples, "
          f"{source.num_classes} classes", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
