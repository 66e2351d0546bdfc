#!/usr/bin/env python
"""What does a Tune search cost against running its trials by hand? (issue 26)

A 4-trial ASHA search, ``python scripts/tune_digits.py`` (the digits CNN with
evaluation, 2 CPU workers, --steps steps, a serving checkpoint and a report
every 100, learning rates 0.003, 0.01, 0.001, 0.0003 in this order, one trial at
a time: ASHA stops only a trial worse than those before it), against the same
4 configs run one after another with ``python -m jobs.train``, as a user types
them (each starts its own local Ray, as the search does once). One run each:
the figure is the ratio of the wall times; also the first step of a trial vs
of a job (what a trial costs to start).

It checks issue 26's acceptance on the search: 4 trials without errors, at
least one stopped early, the best eval/accuracy >= 0.9, and the best result's
storage, run and step export with ``jobs.restore --step N`` (and its Tune
checkpoint with ``jobs.restore --tune-checkpoint``).

    python scripts/bench_tune.py [--steps 400] [--rates 0.003 0.01 0.001 0.0003]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchlib import PY, ROOT, Table, fail_tail, log, run_stamped, run_train_job  # noqa: E402

T_BEST_ACCURACY = 0.9
METRIC = "eval/accuracy"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--steps", type=int, default=400, help="steps per trial (default 400)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.003, 0.01, 0.001, 0.0003],
                   help="the learning rates, one trial each, in this order")
    p.add_argument("--dir", default="/tmp", help="parent of the scratch directory")
    return p.parse_args(argv)


def run_search(args, scratch: str) -> tuple[float, list[dict], list[str]]:
    """``scripts/tune_digits.py`` in its own local Ray; (wall s, rows, lines)."""
    results = os.path.join(scratch, "results.json")
    ray_tmp = tempfile.mkdtemp(prefix="bray", dir="/tmp")  # short: socket paths
    cmd = [PY, "scripts/tune_digits.py", "--steps", str(args.steps),
           "--storage", os.path.join(scratch, "search"),
           "--tune-storage", os.path.join(scratch, "tune"), "--results", results,
           "--rates", *map(str, args.rates)]
    try:
        t0, lines, rc = run_stamped(cmd, env={"RAY_TMPDIR": ray_tmp, "PYTHONPATH": ROOT},
                                    timeout=3600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        fail_tail("tune_digits.py", lines, rc)
    with open(results) as f:
        return lines[-1][0] - t0, json.load(f), [line for _, line in lines]


def run_sequential(args, scratch: str) -> list[dict]:
    """The same configs, one ``python -m jobs.train`` each."""
    import yaml
    with open(os.path.join(ROOT, "jobs/configs/digits_eval.yaml")) as f:
        base = yaml.safe_load(f)
    runs = []
    for i, rate in enumerate(args.rates):
        config = dict(base, steps=args.steps, storage=os.path.join(scratch, "seq"),
                      run=f"seq-{i}", optimizer={"name": "adam", "learning_rate": rate})
        log(f"jobs.train {i + 1}/{len(args.rates)}: learning rate {rate:g} ...")
        result = run_train_job(config, scratch, f"seq-{i}", timeout=1800)
        log(f"  {result['total']:.1f}s, first step after {result['first_step_own']:.1f}s")
        runs.append(result)
    return runs


def exports(row: dict, scratch: str) -> tuple[bool, bool]:
    """Whether ``jobs.restore --step N`` and ``--tune-checkpoint`` export it."""
    def restore(*argv) -> bool:
        export = tempfile.mkdtemp(prefix="export-", dir=scratch)
        proc = subprocess.run([PY, "-m", "jobs.restore", *argv, "--export", export],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        ok = proc.returncode == 0 and os.path.isfile(
            os.path.join(export, str(row["step"]), "saved_model.pb"))
        if not ok:
            log(f"jobs.restore {' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}")
        return ok
    by_step = restore("--storage", row["storage"], "--run", row["run"],
                      "--step", str(row["step"]))
    by_pointer = row["checkpoint"] is not None and restore("--tune-checkpoint",
                                                           row["checkpoint"])
    return by_step, by_pointer


def main(argv=None) -> int:
    args = parse_args(argv)
    # A throwaway token: a new local cluster otherwise writes ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    scratch = tempfile.mkdtemp(prefix="bench_tune-", dir=args.dir)
    try:
        log(f"ASHA search: {len(args.rates)} trials x {args.steps} steps, one at a time ...")
        search_s, rows, lines = run_search(args, scratch)
        log(f"  {search_s:.1f}s")
        sequential = run_sequential(args, scratch)
        best = max((r for r in rows if r[METRIC] is not None), key=lambda r: r[METRIC])
        by_step, by_pointer = exports(best, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    sequential_s = sum(r["total"] for r in sequential)
    trial_starts = [float(m.group(1)) for m in
                    (re.search(r"Trainable.*first step after ([\d.]+)s", line)
                     for line in lines) if m]
    job_starts = [r["first_step_own"] for r in sequential]
    trained: dict[str, int] = {}  # trial process -> the last step it trained
    for line in lines:
        m = re.search(r"Trainable.* pid=(\d+)\) step (\d+)/\d+ ", line)
        if m:
            trained[m.group(1)] = max(trained.get(m.group(1), 0), int(m.group(2)))
    stopped = [r for r in rows if (r["step"] or 0) < args.steps]
    print()
    for r in rows:
        print(f"trial {r['trial_id']}: learning rate {r['config']['optimizer.learning_rate']:g}, "
              f"{r['training_iteration']} report(s), last step {r['step']}, "
              f"{METRIC} {r[METRIC]}, error {r['error']}")
    print(f"jobs.train wall times: {[round(r['total'], 1) for r in sequential]}")
    table = Table()
    ratio = search_s / sequential_s
    table.add(f"wall s, ASHA search ({len(stopped)} stopped early) vs "
              f"{len(args.rates)} jobs.train", f"{search_s:.1f}", f"{sequential_s:.1f}",
              f"{ratio:.3f}x", "", None)
    table.add("steps trained", str(sum(trained.values())),
              str(args.steps * len(args.rates)), "", "", None)
    table.add("first step s after train() began: trial vs jobs.train with its Ray "
              "(median)",
              f"{statistics.median(trial_starts):.1f}" if trial_starts else "?",
              f"{statistics.median(job_starts):.1f}", "", "", None)
    table.add("trials without errors", str(sum(r["error"] is None for r in rows)),
              "", "", f"{len(args.rates)}",
              len(rows) == len(args.rates) and all(r["error"] is None for r in rows))
    table.add("trials stopped early by ASHA", str(len(stopped)), "", "", ">= 1",
              len(stopped) >= 1)
    table.add(f"best {METRIC}", f"{best[METRIC]:.4f}", "", "", f">= {T_BEST_ACCURACY}",
              best[METRIC] >= T_BEST_ACCURACY)
    table.add(f"jobs.restore --step {best['step']} of {best['run']}",
              "exported" if by_step else "failed", "", "", "exported", by_step)
    table.add("jobs.restore --tune-checkpoint of the best result",
              "exported" if by_pointer else "failed", "", "", "exported", by_pointer)
    table.print()
    return 1 if table.fails else 0


if __name__ == "__main__":
    sys.exit(main())
