#!/usr/bin/env python
"""The working tree against a git revision, on the training benchmark's workloads.

New work must not slow the existing benchmarks. ``bench_train.py`` times the
working tree against Ray Train; this script times it against the project itself
at ``--base`` (a checkout of that revision in a temporary git worktree, run
with the same interpreter and packages), so a change's cost is measured
directly. Runs alternate base, ours, base, ours, ... (``--rounds`` pairs) and
each figure is the median steady steps/s (every progress chunk but the first)
of its runs:

- ``mlp``: ``bench_train.py`` part 1's workload (digits MLP 64-256-256-10, batch 64
  per worker, 2 CPU workers, ``steps_per_run`` 10, checkpoints off but the last);
- ``cnn-bn``: the default job's model (the digits CNN with batch norm: its moving
  statistics are exchanged every step), ``steps_per_run`` 1, checkpoints every
  100 steps as the default config takes them.

    python scripts/bench_compare.py --base HEAD~3          # ~6 minutes
    python scripts/bench_compare.py --base main --workloads mlp --rounds 5
    python scripts/bench_compare.py --base HEAD~3 --ours HEAD~1   # two revisions
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _benchlib import ROOT, Table, log, run_train_job  # noqa: E402
from bench_train import MLP_CONFIG  # noqa: E402

WORKLOADS = {
    "mlp": dict(MLP_CONFIG, steps=1500, log_every=300, steps_per_run=10),
    "cnn-bn": {"model": "distributed.examples.digits:cnn_bn_model_fn",
               "model_params": {"filters": [16, 32], "bn_momentum": 0.9},
               "input": "distributed.examples.digits:digits_input_fn",
               "optimizer": {"name": "adam", "learning_rate": 0.001},
               "batch_size": 64, "workers": 2, "cpus_per_worker": 0.5,
               "steps": 600, "log_every": 100,
               "checkpoint": {"serving_every": 100, "full_every": 600}},
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--ours", help="a git revision to time instead of the working tree")
    p.add_argument("--rounds", type=int, default=3, help="base/ours pairs (default 3)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, of {', '.join(WORKLOADS)} (default: all)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        print(f"error: unknown workload(s) {unknown}; use {list(WORKLOADS)}", file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="bench-compare-")
    trees = []

    def checkout(revision: str) -> tuple[str, str]:
        rev = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.strip()
        tree = os.path.join(scratch, f"{rev}-{len(trees)}")  # --base X --ours X: two trees
        subprocess.run(["git", "worktree", "add", "--detach", tree, rev], cwd=ROOT,
                       check=True, capture_output=True)
        trees.append(tree)
        return rev, tree

    try:
        rev, base_tree = checkout(args.base)
        if args.ours:
            ours_rev, ours_tree = checkout(args.ours)
            sides = {f"base {rev}": base_tree, f"ours {ours_rev}": ours_tree}
        else:
            sides = {f"base {rev}": base_tree, "ours (working tree)": ROOT}
        runs = {(w, s): [] for w in names for s in sides}
        for r in range(args.rounds):
            for w in names:
                for side, tree in sides.items():
                    cfg = dict(WORKLOADS[w], storage=os.path.join(scratch, "runs"),
                               run=f"{w}-{r}-{'base' if tree == base_tree else 'ours'}")
                    result = run_train_job(cfg, scratch, f"{w}-{r}", cwd=tree)
                    runs[w, side].append(result["steady_sps"])
                    log(f"round {r + 1}/{args.rounds} {w} {side}: "
                        f"{result['steady_sps']:.1f} steps/s")
        table = Table()
        base_side, ours_side = list(sides)
        for w in names:
            base = statistics.median(runs[w, base_side])
            ours = statistics.median(runs[w, ours_side])
            table.add(f"{w} steady steps/s (median of {args.rounds})", f"{ours:.1f}",
                      f"{base:.1f}", f"{ours / base:.2f}x", "", None)
        print(f"\n{ours_side} vs {base_side}; runs alternate, medians:")
        table.print()
    finally:
        for tree in trees:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT,
                           capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
