"""Train a model data-parallel on Ray with selective, sharded checkpoints.

    python -m jobs.train                       # built-in default: digits CNN, 2 workers
    python -m jobs.train --config my.yaml --workers 4 --run exp1

With no RAY_ADDRESS it starts a local Ray (dev mode) and stops it at the end;
under `ray job submit` or with RAY_ADDRESS set it joins that cluster.
"""

import argparse
import os
import sys

from distributed import config as config_lib  # noqa: E402
from distributed import logs  # noqa: E402
from distributed.cli.argtypes import Parser  # noqa: E402
from distributed.cli.guard import main_guard  # noqa: E402
from distributed.train.trainer import train  # noqa: E402


def parse_args(argv):
    p = Parser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (default: the built-in digits CNN)")
    p.add_argument("--workers", type=int, help="number of data-parallel workers")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument("--storage", help="checkpoint storage directory shared by all nodes")
    p.add_argument("--run", help="run name (re-use one with a full checkpoint to resume)")
    p.add_argument("--verbose", action="store_true",
                   help="also show TensorFlow's native start-up lines and Ray's "
                        "notices (same as DTR_VERBOSE=1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verbose:
        os.environ[logs.VERBOSE_ENV] = "1"
    logs.quiet_native_stderr()  # before TensorFlow is imported
    overrides = {"workers": args.workers, "steps": args.steps,
                 "storage": args.storage, "run": args.run}
    if args.config:
        config = config_lib.load(args.config, overrides)
    else:
        config = config_lib.from_dict({k: v for k, v in overrides.items() if v is not None})
    logs.setup(config.run, "driver")
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
