"""Turn a committed checkpoint into a SavedModel that TF Serving loads.

    python -m jobs.restore --storage runs --run digits-cnn --export exports/digits
    python -m jobs.restore ... --step 300 | --best loss[:min|max]
    python -m jobs.restore ... --map tower/=serving/tower/ --watch --keep 3
    python -m jobs.restore --tune-checkpoint <trial>/checkpoint_000003 --export exports/best

Writes <export>/<step>/ (saved_model.pb + variables/) atomically and records the
export under <storage>/<run>/exports/.
"""

import argparse
import os
import sys

from distributed import logs  # noqa: E402
from distributed.cli.argtypes import Parser, key_value, metric_mode, number  # noqa: E402
from distributed.cli.guard import main_guard  # noqa: E402
from distributed.serving.job import restore_once, watch  # noqa: E402


def parse_args(argv):
    p = Parser(prog="python -m jobs.restore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default="runs",
                   help="storage of the run: a directory or an object store URI "
                        "(s3://bucket/prefix); default: %(default)s")
    p.add_argument("--storage-option", action="append", default=[], type=key_value,
                   metavar="KEY=VALUE", dest="storage_options",
                   help="object store option, e.g. endpoint_override=host:9000, "
                        "region=us-east-1, scheme=http (credentials: the usual "
                        "AWS_* environment variables)")
    p.add_argument("--cache", help="local cache for an object store run "
                                   "(default: the temp dir's dtr-cache/; never a training job's "
                                   "staging directory)")
    p.add_argument("--run", help="run name (required unless --tune-checkpoint names it)")
    p.add_argument("--export", required=True, help="export base directory (TF Serving's model dir)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=number(int, lambda v: v >= 0, "a step >= 0"),
                       help="export this step (fails if it is corrupt)")
    which.add_argument("--best", type=metric_mode, metavar="METRIC[:min|max]",
                       help="export the best by a metric")
    which.add_argument("--tune-checkpoint", metavar="DIR",
                       help="export the serving checkpoint a Ray Tune trial's checkpoint "
                            "directory names (Result.checkpoint.path of a "
                            "distributed.tune search; it gives --storage, --run and "
                            "--step)")
    p.add_argument("--map", action="append", default=[], metavar="CKPT_PREFIX=GRAPH_PREFIX",
                   help="restore checkpoint scope CKPT_PREFIX into graph scope GRAPH_PREFIX")
    p.add_argument("--model", help="serving model_fn (module:function) if not the run's")
    p.add_argument("--watch", action="store_true", help="keep exporting new checkpoints")
    p.add_argument("--keep", type=number(int, lambda v: v >= 1, "an integer >= 1"), default=3,
                   help="versions kept in --watch mode (default: %(default)s)")
    p.add_argument("--poll", type=number(float, lambda v: v > 0, "seconds > 0"), default=10.0,
                   help="seconds between polls in --watch (default: %(default)s)")
    p.add_argument("--verbose", action="store_true",
                   help="also show TensorFlow's native start-up lines (same as "
                        "DTR_VERBOSE=1)")
    args = p.parse_args(argv)
    if args.tune_checkpoint and args.run is not None:
        p.error("--tune-checkpoint names the run (and its storage and step); drop --run")
    if not args.tune_checkpoint and args.run is None:
        p.error("the following arguments are required: --run")
    if args.watch and (args.step is not None or args.best or args.tune_checkpoint):
        p.error("--watch exports each new checkpoint; it does not take --step, --best "
                "or --tune-checkpoint")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verbose:
        os.environ[logs.VERBOSE_ENV] = "1"
    logs.quiet_native_stderr()  # before TensorFlow is imported
    if args.tune_checkpoint:
        from distributed.tune import read_pointer
        pointer = read_pointer(args.tune_checkpoint)
        args.storage, args.run, args.step = pointer.storage, pointer.run, pointer.step
    logs.setup(args.run, "restore")
    reader = {"storage_options": dict(args.storage_options), "cache": args.cache}
    if args.watch:
        watch(args.storage, args.run, args.export, args.map, args.model, args.keep,
              args.poll, **reader)
    else:
        restore_once(args.storage, args.run, args.export, args.step, args.best,
                     args.map, args.model, **reader)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
