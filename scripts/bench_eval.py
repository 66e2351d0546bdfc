#!/usr/bin/env python
"""Does evaluation slow training? (issue 10)

The default job (the digits CNN, 2 CPU workers, serving checkpoints every
``--every`` steps) run as a user runs it, ``python -m jobs.train``, with an
``eval`` block that evaluates every serving checkpoint on the held-out split
(297 digits, in the coordinator's eval thread) and without one. The two run
alternately (ABAB..., ``--pairs`` pairs), and the figure is the ratio of the
medians of their steady-state steps/s (every progress chunk but the first).

    python scripts/bench_eval.py [--pairs 3] [--steps 2000] [--every 100]

Target: steps/s with evaluation at every serving checkpoint >= 0.95x without.
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

T_EVAL_VS_NONE = 0.95  # steps/s with eval every serving checkpoint / without, at least

CONFIG = {
    "model": "distributed.examples.digits:cnn_bn_model_fn",
    "model_params": {"filters": [16, 32], "bn_momentum": 0.9},
    "input": "distributed.examples.digits:digits_input_fn",
    "input_params": {"seed": 0},
    "optimizer": {"name": "adam", "learning_rate": 0.001},
    "batch_size": 64,
    "workers": 2,
    "cpus_per_worker": 0.5,
    "selection": {"policy": "inference"},
}
EVAL = {"input": "distributed.examples.digits:digits_eval_input_fn"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--pairs", type=int, default=3,
                   help="alternating (without, with) run pairs (default 3)")
    p.add_argument("--steps", type=int, default=2000, help="steps per run (default 2000)")
    p.add_argument("--every", type=int, default=100,
                   help="checkpoint.serving_every, and so evaluations (default 100)")
    p.add_argument("--log-every", type=int, default=200,
                   help="progress chunk; the first is start-up (default 200)")
    p.add_argument("--dir", default="/tmp", help="parent of the scratch directory")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.steps < 2 * args.log_every:
        p.error("--pairs must be >= 1 and --steps >= 2 x --log-every")
    return args


def one_run(args, scratch: str, evaluate: bool, tag: str) -> dict:
    name = "eval" if evaluate else "plain"
    config = dict(CONFIG, steps=args.steps, log_every=args.log_every,
                  storage=os.path.join(scratch, name), run=name,
                  checkpoint={"serving_every": args.every, "full_every": 0})
    if evaluate:
        config["eval"] = EVAL
    log(f"{name}: python -m jobs.train, digits CNN, {args.steps} steps, serving "
        f"checkpoint every {args.every}{' + evaluation' if evaluate else ''}{tag} ...")
    result = run_train_job(config, scratch, name)
    lines = result.pop("lines")
    result["evaluated"] = sum("eval/accuracy" in line for line in lines
                              if "committed serving" in line)
    result["skipped"] = sum("skipped evaluating" in line
                            for line in lines)
    shutil.rmtree(config["storage"], ignore_errors=True)
    log(f"  {result['steady_sps']:.1f} steps/s (chunks {result['chunks']}), "
        f"{result['evaluated']} checkpoints evaluated")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    # A throwaway token: a new local cluster otherwise writes ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    scratch = tempfile.mkdtemp(prefix="bench_eval-", dir=args.dir)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    try:
        for pair in range(args.pairs):
            tag = f" (round {pair + 1}/{args.pairs})"
            for evaluate in (False, True) if pair % 2 == 0 else (True, False):
                runs[evaluate].append(one_run(args, scratch, evaluate, tag))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    plain = statistics.median(r["steady_sps"] for r in runs[False])
    with_eval = statistics.median(r["steady_sps"] for r in runs[True])
    evaluated = statistics.median(r["evaluated"] for r in runs[True])
    table = Table()
    ratio = with_eval / plain
    table.add(f"steps/s, eval every serving checkpoint ({evaluated:.0f} evaluated) "
              "vs none", f"{with_eval:.1f}", f"{plain:.1f}", f"{ratio:.3f}x",
              f">= {T_EVAL_VS_NONE}x", ratio >= T_EVAL_VS_NONE)
    print()
    print(f"per run, without: {[round(r['steady_sps'], 1) for r in runs[False]]}; "
          f"with: {[round(r['steady_sps'], 1) for r in runs[True]]}")
    table.print()
    return 1 if table.fails else 0


if __name__ == "__main__":
    sys.exit(main())
