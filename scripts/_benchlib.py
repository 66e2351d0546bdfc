"""What the benchmarks share: a log line, the results table, and running
``python -m jobs.train`` as a user does, timing its progress lines.

Figures are ratios against a baseline measured in the same run (the machines
are shared and noisy); each benchmark alternates its variants and takes medians.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def print_table(heads, rows) -> None:
    """``rows`` (tuples of strings) under ``heads``, each column as wide as its
    widest cell, a rule under the heads."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*heads))
    print(fmt.format(*("-" * w for w in widths)))
    for r in rows:
        print(fmt.format(*r).rstrip())


class Table:
    """Rows of (measure, ours, baseline, ratio, target, PASS/FAIL/blank)."""

    def __init__(self):
        self.rows = []

    def add(self, name, ours, base, ratio, target, ok):
        self.rows.append((name, ours, base, ratio, target,
                          "" if ok is None else ("PASS" if ok else "FAIL")))

    def print(self):
        print_table(("measure", "ours", "baseline", "ratio", "target", "result"),
                    self.rows)

    @property
    def fails(self):
        return sum(r[5] == "FAIL" for r in self.rows)


def run_stamped(cmd, env=None, timeout=300, cwd=ROOT):
    """Runs ``cmd`` in ``cwd``; returns (wall time at start, [(wall time, line)], rc)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("RAY_ADDRESS", None)  # every command starts its own local Ray
    lines = []
    t_start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)

    def reader():
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    th.join(5)
    return t_start, lines, rc


def fail_tail(name, lines, rc):
    tail = "\n".join(l for _, l in lines[-25:])
    raise RuntimeError(f"{name} exited {rc}; last output:\n{tail}")


def run_train_job(config: dict, scratch: str, name: str, timeout: float = 600,
                  cwd: str = ROOT) -> dict:
    """``python -m jobs.train --config`` on ``config`` (written as YAML under
    ``scratch``), in its own local Ray, run from ``cwd`` (another checkout's
    root runs that checkout's code); returns its timings: the first step
    (from the command's start and the job's own figure), each progress chunk's
    steps/s, and the steady steps/s over every chunk but the first."""
    import yaml
    path = os.path.join(scratch, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    # Its own Ray temp dir: ``ray.init()`` without an address joins the cluster
    # that /tmp/ray/ray_current_cluster names (another user's ``ray start`` on
    # this shared machine) instead of starting a local one.
    ray_tmp = tempfile.mkdtemp(prefix="bray", dir="/tmp")  # short: socket paths
    try:
        t0, lines, rc = run_stamped([PY, "-m", "jobs.train", "--config", path],
                                    env={"RAY_TMPDIR": ray_tmp, "PYTHONPATH": cwd},
                                    timeout=timeout, cwd=cwd)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        fail_tail("jobs.train", lines, rc)
    first = next(((t, l) for t, l in lines if "first step after" in l), None)
    if first is None:
        fail_tail("jobs.train (no 'first step after' line)", lines, rc)
    own = float(re.search(r"first step after ([\d.]+)s", first[1]).group(1))
    chunks = []
    for _, l in lines:
        # "loss" before the progress line said "mean loss" (bench_compare's base)
        m = re.match(r"step (\d+)/\d+\s+(?:mean )?loss \S+\s+([\d.]+) steps/s", l)
        if m:
            chunks.append((int(m.group(1)), float(m.group(2))))
    prev, per = 0, []
    for step, sps in chunks:
        per.append((step - prev, sps))
        prev = step
    steady = per[1:]
    steps = sum(n for n, _ in steady)
    secs = sum(n / s for n, s in steady)
    return {"first_step_cmd": first[0] - t0, "first_step_own": own,
            "chunks": [round(s, 1) for _, s in per], "steady_sps": steps / secs,
            "steady_steps": steps, "total": lines[-1][0] - t0,
            "lines": [l for _, l in lines]}
