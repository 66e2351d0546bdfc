"""Inspect, verify, compare and clean up one run's checkpoints.

    python -m distributed.ckpt ls     --run digits-cnn [--tier serving|full]
    python -m distributed.ckpt show   300 --run digits-cnn [--depth 2]
    python -m distributed.ckpt verify [300] --run digits-cnn
    python -m distributed.ckpt diff   200 300 --run digits-cnn [--all]
    python -m distributed.ckpt gc     --run digits-cnn [--keep-last 3] [--dry-run]

Every command takes --storage (default: runs, as the train job; an object
store URI such as s3://bucket/prefix is read through a local cache, see
--cache, for every command but gc) and --run, and prints a table, or with --json one JSON document; ls, show, verify and diff
with --parquet FILE also write their table as Parquet. None imports TensorFlow.
Exit status: 0 ok, 1 verify found a bad checkpoint, 2 a usage, storage or
catalog error (one line on stderr). gc must not run while the run trains: see
gc --help.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Sequence

from distributed.checkpoint.catalog import CorruptCatalogRowWarning
from distributed.checkpoint.layout import STEP_DIGITS, TIERS
from distributed.checkpoint.metric_goal import MetricGoal
from distributed.cli.argtypes import Parser, key_value, metric_mode, number
from distributed.cli.ckpt import cleanup, commands, diff
from distributed.cli.ckpt.output import Report, emit
from distributed.errors import DistributedError
from distributed.storage.runstore import open_offline_writer, open_reader

PROG = "python -m distributed.ckpt"

GC_WARNING = """\
WARNING: do not run gc while the run is training. A run has one writer, and gc
is a second one: it could delete a checkpoint the trainer has written but not
yet committed. gc refuses when the run wrote in the last 10 minutes (a fresh
catalog row, a save in flight); that catches a run that saves often, not one
that saves rarely, so stop the run first. --force skips the check; --dry-run
needs no check.

With no --keep-* flag gc applies the retention the run trains with (its
run_config.json); flags replace it for every tier gc touches. The newest
checkpoint of each tier is always kept, and a checkpoint a reader holds a lease
on leaves the catalog at once but keeps its files until a later gc."""


_step = number(int, lambda v: 0 <= v < 10**STEP_DIGITS,
               f"a step in [0, {10**STEP_DIGITS})")
_positive = number(int, lambda v: v >= 1, "an integer >= 1")


def build_parser() -> argparse.ArgumentParser:
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--storage", default="runs",
                     help="storage directory, or object store URI such as "
                          "s3://bucket/prefix (default: runs, as the train job)")
    run.add_argument("--run", required=True, help="run name")
    run.add_argument("--storage-option", action="append", default=[], type=key_value,
                     metavar="KEY=VALUE", dest="storage_options",
                     help="object store option, e.g. endpoint_override=host:9000 "
                          "(credentials: the usual AWS_* environment variables)")
    run.add_argument("--cache", help="local cache for an object store run (default: "
                                     "the temp dir's dtr-cache/)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print one JSON document")
    out.add_argument("--parquet", metavar="FILE", help="also write the table to FILE")
    one_tier = argparse.ArgumentParser(add_help=False)
    one_tier.add_argument("--tier", choices=TIERS,
                          help="the checkpoint's tier (default: serving, or full "
                          "when only full has the step)")
    any_tier = argparse.ArgumentParser(add_help=False)
    any_tier.add_argument("--tier", choices=TIERS, help="only this tier (default: both)")

    p = Parser(prog=PROG, description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=Parser)
    sub.add_parser("ls", parents=[run, out, any_tier], help="list committed checkpoints",
                   description="The run's catalog: one row per committed checkpoint.")
    s = sub.add_parser("show", parents=[run, out, one_tier],
                       help="one checkpoint's tensors",
                       description="A checkpoint's manifest: every tensor's dtype, "
                       "shape, bytes and shard, and bytes per scope.")
    s.add_argument("step", type=_step)
    s.add_argument("--depth", type=_positive, default=1,
                   help="scope = the first N '/'-separated parts of a name (default 1)")
    v = sub.add_parser("verify", parents=[run, out, any_tier],
                       help="check every byte's checksum",
                       description="Verify checkpoint STEP (serving, or full when "
                       "only full has it, unless --tier), or every committed one, "
                       "down the checksum chain; exit 1 if any is bad.")
    v.add_argument("step", type=_step, nargs="?")
    d = sub.add_parser("diff", parents=[run, out, one_tier],
                       help="compare two checkpoints",
                       description="Which tensors changed between checkpoints A and "
                       "B, and by how much (max |B-A|, ||B-A|| / ||A||).")
    d.add_argument("a", type=_step, metavar="A")
    d.add_argument("b", type=_step, metavar="B")
    d.add_argument("--all", action="store_true", help="list unchanged tensors too")
    g = sub.add_parser("gc", parents=[run, any_tier],
                       help="apply retention, remove leftovers",
                       description="Apply retention and remove leftovers of "
                       "interrupted saves.", epilog=GC_WARNING,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--keep-last", type=_positive, metavar="N",
                   help="keep the N newest checkpoints")
    g.add_argument("--keep-every", type=_positive, metavar="K",
                   help="keep steps that are multiples of K")
    g.add_argument("--keep-best", type=metric_mode, metavar="METRIC[:min|max]")
    g.add_argument("--keep-best-n", type=_positive, metavar="N",
                   help="how many --keep-best keeps (default 1)")
    g.add_argument("--dry-run", action="store_true", help="only say what would go")
    g.add_argument("--force", action="store_true",
                   help="skip the check that the run is not training")
    g.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "gc" and args.keep_best_n is not None and not args.keep_best:
        parser.error("--keep-best-n needs --keep-best METRIC")
    return args


def run_command(args: argparse.Namespace) -> Report:
    """Runs the parsed command; returns its report.

    An object store run is read through a local cache (see
    :func:`~distributed.storage.runstore.open_reader`): checkpoints are
    fetched into it before they are read, and ``show`` fetches the manifest
    alone. ``gc`` is a second writer, for a directory only.
    """
    if args.command == "gc":
        return _gc(args)
    store = open_reader(args.storage, args.run, dict(args.storage_options), args.cache)
    if args.command == "ls":
        return commands.ls(store, args.tier)
    if args.command == "show":
        return commands.show(store, args.step, args.tier, args.depth)
    if args.command == "verify":
        return commands.verify(store, args.step, args.tier)
    return diff.diff(store, args.a, args.b, args.tier, args.all)


def _gc(args: argparse.Namespace) -> Report:
    store = open_offline_writer(args.storage, args.run)
    best = None
    if args.keep_best:
        goal = MetricGoal.parse(args.keep_best)
        best = {"metric": goal.metric, "mode": goal.mode, "n": args.keep_best_n or 1}
    retention = cleanup.retention_from_flags(
        {"keep_last": args.keep_last, "keep_every": args.keep_every, "keep_best": best})
    return cleanup.gc(store, retention, args.tier, args.dry_run, args.force)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point: returns the exit status; user errors print one
    ``error:`` line on stderr and return 2, with no traceback."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    with warnings.catch_warnings():
        warnings.simplefilter("always", CorruptCatalogRowWarning)
        warnings.showwarning = _show_warning
        try:
            report = run_command(args)
            return emit(report, args.json, getattr(args, "parquet", None), sys.stdout)
        except (DistributedError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


def run() -> None:
    """The process entry point (``python -m``, the console script): :func:`main`,
    then exit at once with its status.

    Skipping interpreter teardown is deliberate: pyarrow's Parquet reader can
    leave a native thread that aborts the process while Python shuts down
    (``terminate called without an active exception``, exit 134;
    apache/arrow#34314), which would turn a clean ``verify`` into a failure.
    Every lease is released and all output written before this exits.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
