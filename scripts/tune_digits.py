#!/usr/bin/env python
"""Hyperparameter search with Ray Tune: the digits CNN's learning rate under ASHA.

    python scripts/tune_digits.py                     # 4 learning rates, 400 steps each
    python scripts/tune_digits.py --rates 0.001 0.01 --steps 300 --storage runs

Each trial trains its own run (``<run>_<trial id>``) of --config under
--storage, evaluated at every serving checkpoint; ASHA stops the trials whose
eval/accuracy falls behind. The best trial's checkpoint exports like any run's:
the last lines print the ``python -m jobs.restore`` command. With no
RAY_ADDRESS a local Ray is started (and stopped at the end), as jobs.train does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from distributed import config as config_lib  # noqa: E402  (first: the one TF world)
from distributed import logs  # noqa: E402
from distributed.cli.argtypes import Parser, number  # noqa: E402
from distributed.cli.guard import main_guard  # noqa: E402
from distributed.train.cluster import connect_ray, ray_shutdown  # noqa: E402

METRIC = "eval/accuracy"


def parse_args(argv):
    p = Parser(prog="python scripts/tune_digits.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "jobs/configs/digits_eval.yaml"),
                   help="the config every trial trains (default: %(default)s)")
    p.add_argument("--rates", type=number(float, lambda v: v > 0, "a rate > 0"), nargs="+",
                   default=[0.003, 0.01, 0.001, 0.0003],
                   help="optimizer.learning_rate grid, one trial each, run in this order "
                        "(default: %(default)s; one trial at a time, ASHA stops only a "
                        "trial worse than the ones before it)")
    p.add_argument("--steps", type=number(int, lambda v: v > 0, "steps > 0"), default=400,
                   help="steps per trial (default: %(default)s)")
    p.add_argument("--serving-every", type=number(int, lambda v: v > 0, "steps > 0"),
                   default=100, help="steps between serving checkpoints, each evaluated "
                                     "and reported to Tune (default: %(default)s)")
    p.add_argument("--storage", default="runs", help="the trials' runs (default: %(default)s)")
    p.add_argument("--tune-storage", help="Tune's own experiment directory (default: "
                                          "Tune's, ~/ray_results)")
    p.add_argument("--max-concurrent", type=number(int, lambda v: v > 0, "trials > 0"),
                   default=1, help="trials at once; each holds its coordinator and "
                                   "workers (default: %(default)s)")
    p.add_argument("--results", metavar="FILE",
                   help="also write each trial's last result as JSON to FILE")
    return p.parse_args(argv)


def search_config(args) -> config_lib.TrainConfig:
    config = config_lib.load(args.config, {"steps": args.steps, "storage": args.storage})
    checkpoint = dataclasses.replace(config.checkpoint, serving_every=args.serving_every)
    return dataclasses.replace(config, checkpoint=checkpoint).validate()


def main(argv=None) -> int:
    args = parse_args(argv)
    logs.quiet_native_stderr()  # before TensorFlow is imported
    config = search_config(args)
    started = connect_ray()
    try:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler

        from distributed.tune import trainable
        reports = max(1, args.steps // args.serving_every)
        tuner = tune.Tuner(
            trainable(config),
            param_space={"optimizer.learning_rate": tune.grid_search(args.rates)},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", max_concurrent_trials=args.max_concurrent,
                scheduler=ASHAScheduler(max_t=reports, grace_period=1, reduction_factor=2)),
            run_config=tune.RunConfig(
                storage_path=args.tune_storage and os.path.abspath(args.tune_storage),
                verbose=1))
        results = tuner.fit()
        rows = [_row(result) for result in results]
        _print_table(rows)
        if args.results:
            with open(args.results, "w") as f:
                json.dump(rows, f, indent=2)
        best = results.get_best_result()
        if best.error is not None or METRIC not in best.metrics:
            print("no trial reported a result", file=sys.stderr)
            return 1
        m = best.metrics
        print(f"best: {m['run']} step {m['step']} with {METRIC} {m[METRIC]:.4f}; export it with\n"
              f"  python -m jobs.restore --storage {m['storage']} --run {m['run']} "
              f"--step {m['step']} --export exports/{config.run}")
        return 0
    finally:
        if started:
            ray_shutdown()


def _row(result) -> dict:
    m = result.metrics or {}
    return {"trial_id": m.get("trial_id"), "config": result.config,
            "training_iteration": m.get("training_iteration"), "step": m.get("step"),
            "run": m.get("run"), "storage": m.get("storage"), METRIC: m.get(METRIC),
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "error": None if result.error is None else str(result.error)}


def _print_table(rows: list[dict]) -> None:
    print(f"{'trial':14} {'learning_rate':>13} {'reports':>7} {'step':>5} {METRIC:>13}  run")
    for r in rows:
        accuracy = "" if r[METRIC] is None else f"{r[METRIC]:.4f}"
        print(f"{r['trial_id'] or '?':14} {r['config']['optimizer.learning_rate']:>13g} "
              f"{r['training_iteration'] or 0:>7} {r['step'] or '':>5} {accuracy:>13}  "
              f"{r['run'] or r['error']}")


if __name__ == "__main__":
    sys.exit(main_guard(main))
