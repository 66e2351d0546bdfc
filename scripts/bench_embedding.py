#!/usr/bin/env python
"""Benchmarks embedding models (issue 11), part by part.

Parts (``--parts``, comma-separated, default all; each runs alone):

* ``exchange``: steps/s of ``distributed.examples.embedding`` (a 200,000 x 64
  float32 table, 8 lookups x 64 examples a worker, mean-pooled into a dense
  head; 2 CPU workers, plain SGD, checkpoints off but the last step) run as a
  user runs it, ``python -m jobs.train``, with the table's gradient exchanged
  sparsely (``sparse_density_threshold: 0.5``, the default: the rows and
  indices every worker looked up are all-gathered, ~270 KB a step) vs densely
  (``sparse_density_threshold: 0``: the whole 51 MB table all-reduced, as
  before). The two alternate (ABAB..., ``--pairs`` pairs); each figure is the
  median of its runs' steady steps/s (every progress chunk but the first).
  Target: sparse >= 10x dense.
* ``checkpoint``: a >= 1 GiB partitioned table (``--ckpt-rows`` x
  ``--ckpt-dim`` float32 in ``--ckpt-parts`` parts): serving-checkpoint save
  with our sharded writer (manifest, fsync, commit) vs a stock
  ``tf.compat.v1.train.Saver(sharded=True)`` of the same variables (+ fsync);
  restore (ours: verified read + load) vs ``Saver.restore``; and restore into
  another partitioning (``--ckpt-other-parts``) vs into the same one. In
  process, alternating, medians (see ``scripts/_bench_embedding_ckpt.py``).

    python scripts/bench_embedding.py                          # ~4 minutes on 2 cores
    python scripts/bench_embedding.py --parts exchange --pairs 1 --dense-steps 40
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchlib import Table, log, run_train_job  # noqa: E402

# Targets: never change these to make a run pass.
T_SPARSE_VS_DENSE = 10.0  # steps/s, sparse exchange / dense all-reduce, at least

EMBEDDING = "distributed.examples.embedding"


def embedding_config(args, scratch: str, name: str, threshold: float, steps: int) -> dict:
    """The benchmark model's job config; only the threshold differs between runs."""
    table = {"vocab": args.vocab, "dim": args.dim}
    return {
        "model": f"{EMBEDDING}:embedding_model_fn", "model_params": table,
        "input": f"{EMBEDDING}:embedding_input_fn",
        "input_params": {"vocab": args.vocab, "lookups": args.lookups},
        "optimizer": {"name": "sgd", "learning_rate": 0.1},
        "batch_size": args.batch_size, "workers": 2, "cpus_per_worker": 0.5,
        "steps": steps, "log_every": max(1, steps // args.chunks),
        "sparse_density_threshold": threshold,
        "selection": {"policy": "trainable"},
        "checkpoint": {"serving_every": 0, "full_every": 0},
        "storage": os.path.join(scratch, name), "run": name,
    }


def _exchange_run(args, scratch: str, sparse: bool, tag: str) -> dict:
    name = "sparse" if sparse else "dense"
    steps = args.sparse_steps if sparse else args.dense_steps
    config = embedding_config(args, scratch, name, 0.5 if sparse else 0.0, steps)
    log(f"{name}: python -m jobs.train, {args.vocab} x {args.dim} table, "
        f"sparse_density_threshold {config['sparse_density_threshold']}, {steps} "
        f"steps{tag} ...")
    result = run_train_job(config, scratch, name)
    result.pop("lines")
    shutil.rmtree(config["storage"], ignore_errors=True)
    log(f"  {result['steady_sps']:.1f} steps/s (chunks {result['chunks']})")
    return result


def part_exchange(args, scratch: str, table: Table, notes: list[str]) -> None:
    """Sparse all-gather vs dense all-reduce of the table's gradient."""
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for pair in range(args.pairs):
        tag = f" (round {pair + 1}/{args.pairs})"
        for sparse in (False, True) if pair % 2 == 0 else (True, False):
            runs[sparse].append(_exchange_run(args, scratch, sparse, tag))
    dense = statistics.median(r["steady_sps"] for r in runs[False])
    sparse = statistics.median(r["steady_sps"] for r in runs[True])
    ratio = sparse / dense
    table.add("exchange: steps/s, sparse all-gather vs dense all-reduce",
              f"{sparse:.1f}", f"{dense:.1f}", f"{ratio:.1f}x",
              f">= {T_SPARSE_VS_DENSE:g}x", ratio >= T_SPARSE_VS_DENSE)
    rows = 2 * args.batch_size * args.lookups
    notes.append(
        f"exchange: per step, dense all-reduces {args.vocab * args.dim * 4 / 1e6:.1f} MB; "
        f"sparse gathers {rows} rows x ({args.dim} x 4 + 8) B = "
        f"{rows * (args.dim * 4 + 8) / 1e3:.0f} KB (+ one 16-byte row-count gather)")
    notes.append(f"exchange: steps/s per run, dense "
                 f"{[round(r['steady_sps'], 1) for r in runs[False]]} "
                 f"({args.dense_steps} steps), sparse "
                 f"{[round(r['steady_sps'], 1) for r in runs[True]]} "
                 f"({args.sparse_steps} steps); first chunk of {args.chunks} excluded")


def part_checkpoint(args, scratch: str, table: Table, notes: list[str]) -> None:
    """The partitioned table's checkpoints (``_bench_embedding_ckpt.py``):
    save and restore vs a stock ``Saver``, restore into another partitioning."""
    import _bench_embedding_ckpt
    args.dir = scratch
    table.rows.extend(_bench_embedding_ckpt.run(args))


PARTS = {"exchange": part_exchange, "checkpoint": part_checkpoint}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run: {', '.join(PARTS)} (default all)")
    p.add_argument("--pairs", type=int, default=2,
                   help="exchange: alternating (dense, sparse) run pairs (default 2)")
    p.add_argument("--dense-steps", type=int, default=160,
                   help="exchange: steps of a dense run (default 160, ~6 steps/s)")
    p.add_argument("--sparse-steps", type=int, default=2000,
                   help="exchange: steps of a sparse run (default 2000)")
    p.add_argument("--chunks", type=int, default=4,
                   help="progress chunks per run; the first is start-up (default 4)")
    p.add_argument("--vocab", type=int, default=200_000, help="table rows (default 200000)")
    p.add_argument("--dim", type=int, default=64, help="table columns (default 64)")
    p.add_argument("--lookups", type=int, default=8, help="ids per example (default 8)")
    p.add_argument("--batch-size", type=int, default=64, help="per worker (default 64)")
    p.add_argument("--dir", default="/tmp", help="parent of the scratch directory")
    import _bench_embedding_ckpt
    _bench_embedding_ckpt.add_arguments(p)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if not args.parts or unknown:
        p.error(f"--parts: expected some of {', '.join(PARTS)}, got {unknown or 'none'}")
    if args.pairs < 1 or args.chunks < 2:
        p.error("--pairs must be >= 1 and --chunks >= 2")
    if min(args.dense_steps, args.sparse_steps) < 2 * args.chunks:
        p.error("--dense-steps and --sparse-steps must be >= 2 x --chunks")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # A throwaway token: a new local cluster otherwise writes ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    scratch = tempfile.mkdtemp(prefix="bench_embedding-", dir=args.dir)
    table, notes = Table(), []
    try:
        for part in args.parts:
            PARTS[part](args, scratch, table, notes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    table.print()
    print()
    for note in notes:
        print(note)
    return 1 if table.fails else 0


if __name__ == "__main__":
    sys.exit(main())
