#!/usr/bin/env python
"""The acceptance of exactly-once input (issue 22), through the documented CLI.

Every run is ``python -m jobs.train --config ... --storage ... --run ...
[--steps N]`` in a subprocess, as a user runs it (its own local Ray, under a
private ``RAY_TMPDIR``), on the seen-count model of
``tests/helpers/position_models.py``: ids 0..2047, each worker reads its shard,
a per-id count ``state/seen`` (non-trainable, written in ``UPDATE_OPS``, summed
across workers) and one weight per id; 2 workers, batch 16, ``--steps`` steps
(default 2,000), a full checkpoint every ``--every`` (default 500). The configs
are ``jobs/configs/position_{tfdata,generator,resumable}.yaml``; for another
``--every`` the script writes a copy with that ``checkpoint.full_every`` (and a
``log_every`` of half of it) into its scratch directory.

Cases (each compared with a run trained straight through):

  tfdata       tf.data: a run stopped at steps/2 and resumed (same --run) to
               the end
  sigkill      tf.data: a run one of whose worker processes (``ray::Worker``,
               a descendant of the job's driver) gets SIGKILL the moment the
               job prints its first committed full checkpoint; the group
               restarts from a full checkpoint and redoes the steps after it
  generator    a plain Python generator: stopped at steps/2 and resumed (the
               workers replay the consumed batches: the "replayed N batches in
               S s" line of their --verbose log is shown)
  resumable    a generator that takes ``start_batch``: stopped and resumed (no
               replay); its straight run is also compared with the plain
               generator's (the same batches)
  control      tf.data with ``input_position: restart`` stopped and resumed:
               it must NOT match (the check can fail)

A case passes when the final full checkpoints hold exactly the same per-id
counts (each run's counts summing to steps x 2 x 16) and weights within 1e-4,
read with ``tf.train.load_checkpoint``. Prints a table; exits 1 on any
mismatch or failed job.

    python scripts/check_input_position.py                  # ~5 minutes on 2 cores
    python scripts/check_input_position.py --steps 40 --every 10
"""

from __future__ import annotations

import argparse
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _benchlib import print_table  # noqa: E402

CONFIGS = {kind: os.path.join(ROOT, "jobs", "configs", f"position_{kind}.yaml")
           for kind in ("tfdata", "generator", "resumable")}
WORKERS, BATCH = 2, 16
ATOL = 1e-4


def log(msg: str) -> None:
    print(f"[check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


CASES = ("tfdata", "sigkill", "generator", "resumable", "control")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--steps", type=int, default=2000, help="steps of a run (default 2000)")
    p.add_argument("--every", type=int, default=500,
                   help="steps between full checkpoints (default 500)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"which cases (default all: {','.join(CASES)})")
    p.add_argument("--seed", type=int, default=0, help="picks the worker killed")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds one job may take (default 600)")
    p.add_argument("--dir", default=None, help="parent of the scratch directory")
    p.add_argument("--keep", action="store_true", help="keep the runs' storage")
    p.add_argument("--verbose", action="store_true", help="print every job's output")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.cases or not set(args.cases) <= set(CASES):
        p.error(f"--cases: expected some of {','.join(CASES)}")
    if args.steps < 2 or args.steps % 2:
        p.error("--steps: expected an even number >= 2")
    if args.every < 1 or (args.steps // 2) % args.every:
        p.error("--every must divide --steps / 2 (the stopped runs end on a full "
                "checkpoint of the schedule)")
    if args.every >= args.steps:
        p.error("--every must be below --steps (the killed run needs a full "
                "checkpoint before its end)")
    return args


class Job:
    """One ``python -m jobs.train`` subprocess; its output lines are read on a
    thread, and ``on_line`` sees each (it may act on the job)."""

    def __init__(self, args, scratch, config, run, steps=None, verbose=False,
                 on_line=None):
        cmd = [sys.executable, "-m", "jobs.train", "--config", config,
               "--storage", os.path.join(scratch, "storage"), "--run", run]
        cmd += ["--steps", str(steps if steps is not None else args.steps)]
        if verbose:
            cmd.append("--verbose")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_ADDRESS") and k != "DTR_VERBOSE"}
        # Its own Ray temp dir (other sessions on the machine run Rays under
        # /tmp/ray), short: Ray's unix socket paths must stay under 108 bytes.
        env.update(PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", RAY_TMPDIR=args.ray_tmp)
        env.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        self.run, self.lines, self.args = run, [], args
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._on_line = on_line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.args.verbose:
                print(f"    {self.run}| {line}", flush=True)
            if self._on_line is not None:
                self._on_line(self, line)

    def wait(self):
        try:
            rc = self.proc.wait(timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            self.lines.append(f"(killed by the check after {self.args.timeout:.0f}s)")
        self._reader.join(30)
        self.seconds = time.perf_counter() - self.t0
        self.rc = rc
        return self

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Failure(Exception):
    pass


def run_job(args, scratch, config, run, steps=None, verbose=False, on_line=None,
            expect=()):
    """Runs a job to its end; raises :class:`Failure` with its output's tail
    when it fails or a line it must print is missing."""
    job = Job(args, scratch, config, run, steps, verbose, on_line).wait()
    tail = "\n".join(job.lines[-25:])
    if job.rc != 0:
        raise Failure(f"job {run!r} exited {job.rc}:\n{tail}")
    for pattern in expect:
        if not re.search(pattern, job.text):
            raise Failure(f"job {run!r} did not print /{pattern}/:\n{tail}")
    log(f"{run}: {steps or args.steps} steps, exit 0, {job.seconds:.1f} s")
    return job


def derived_config(args, scratch, kind, **changes) -> str:
    """The config of ``kind`` with ``--every`` (and ``changes``), as a file."""
    import yaml
    with open(CONFIGS[kind]) as f:
        data = yaml.safe_load(f)
    data["checkpoint"] = dict(data.get("checkpoint") or {}, full_every=args.every)
    data["log_every"] = min(int(data.get("log_every", 250)), max(1, args.every // 2))
    data.update(changes)
    name = "-".join([kind, *(f"{k}_{v}" for k, v in changes.items())])
    path = os.path.join(scratch, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def final_state(scratch: str, run: str, steps: int) -> dict:
    import distributed  # noqa: F401  the one TF world, before TensorFlow
    import tensorflow as tf

    from distributed.checkpoint import RunLayout
    prefix = os.path.join(RunLayout(os.path.join(scratch, "storage"), run)
                          .checkpoint_dir("full", steps), "model.ckpt")
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in ("state/seen", "w")}


def compare(a: dict, b: dict, steps: int) -> tuple[bool, float, str]:
    """(counts equal, max |weight diff|, note on the totals)."""
    import numpy as np
    want = steps * WORKERS * BATCH
    totals = [int(s["state/seen"].sum()) for s in (a, b)]
    equal = bool(np.array_equal(a["state/seen"], b["state/seen"]))
    diff = float(np.max(np.abs(a["w"] - b["w"])))
    note = "" if totals == [want, want] else f"counts sum to {totals}, want {want}"
    return equal, diff, note


def worker_pids(job: Job) -> list[int]:
    """The job's worker actor processes (``ray::Worker...``), descendants of
    its driver (its own local Ray), never another Ray's."""
    import psutil
    pids = []
    for child in psutil.Process(job.proc.pid).children(recursive=True):
        try:
            if child.name().startswith("ray::Worker") or \
                    (child.cmdline()[:1] or [""])[0].startswith("ray::Worker"):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return sorted(pids)


def killer(args, rng: random.Random, record: dict):
    """An ``on_line`` that SIGKILLs one worker the moment the job prints its
    first committed full checkpoint (the workers are training on then: the
    kill lands mid-round). The workers' pids are looked up at the first
    progress line, so the kill itself is one ``os.kill``."""
    first = f"committed full checkpoint at step {args.every}"

    def on_line(job: Job, line: str) -> None:
        if "workers" not in record and line.startswith("step "):
            record["workers"] = worker_pids(job)
        if "at" in record or first not in line:
            return
        record["at"] = line.strip()
        pids = record.get("workers") or worker_pids(job)
        if len(pids) == WORKERS:
            record["victim"] = rng.choice(pids)
            try:
                os.kill(record["victim"], signal.SIGKILL)
            except ProcessLookupError:  # the run ended first: said below
                pass

    return on_line


def main(argv=None) -> int:
    args = parse_args(argv)
    from distributed import logs
    logs.quiet_native_stderr()  # TF's start-up lines, when this reads checkpoints
    t_start = time.perf_counter()
    steps, half = args.steps, args.steps // 2
    scratch = tempfile.mkdtemp(prefix="chk-pos-", dir=args.dir)
    args.ray_tmp = tempfile.mkdtemp(prefix="cray", dir="/tmp")
    log(f"{steps} steps, full checkpoint every {args.every}, {WORKERS} workers x batch "
        f"{BATCH}; cases {','.join(args.cases)}; scratch {scratch}")
    resumed_line = (rf"resuming run '{{run}}' from its full checkpoint at step {half}\b")
    rows, failures = [], []

    def row(case, reference, job_seconds, a, b, note="", expect_equal=True):
        equal, diff, total_note = compare(a, b, steps)
        ok = (equal and diff <= ATOL) if expect_equal else (not equal)
        ok = ok and not total_note
        rows.append((case, reference, "yes" if equal else "NO", f"{diff:.2e}",
                     f"{job_seconds:.1f}", "PASS" if ok else "FAIL",
                     "; ".join(n for n in (total_note, note) if n)))
        if not ok:
            failures.append(case)

    def stopped_and_resumed(kind, run, config, verbose=False):
        a = run_job(args, scratch, config, run, steps=half)
        b = run_job(args, scratch, config, run, verbose=verbose,
                    expect=[resumed_line.format(run=run)])
        return a.seconds + b.seconds, b

    try:
        states = {}
        if {"tfdata", "sigkill", "control"} & set(args.cases):
            cfg = derived_config(args, scratch, "tfdata")
            job = run_job(args, scratch, cfg, "tfdata-straight")
            states["tfdata"] = final_state(scratch, "tfdata-straight", steps)
            rows.append(("tf.data straight", "-", "", "", f"{job.seconds:.1f}", "", ""))
        if "tfdata" in args.cases:
            try:
                secs, _ = stopped_and_resumed("tfdata", "tfdata-resumed", cfg)
                row(f"tf.data {half} + resume", "tf.data straight", secs,
                    states["tfdata"], final_state(scratch, "tfdata-resumed", steps))
            except Failure as e:
                failures.append(f"tf.data resume: {e}")
        if "sigkill" in args.cases:
            record: dict = {}
            try:
                job = run_job(args, scratch, cfg, "tfdata-killed",
                              on_line=killer(args, random.Random(args.seed), record))
                restarted = re.search(r"restarted: resuming from the full checkpoint "
                                      r"at step \d+[^\n]*", job.text)
                failure_lines = [ln for ln in job.lines if ln.startswith("FAILURE")]
                if "victim" not in record:
                    raise Failure(f"no worker was killed (found {record.get('workers')} "
                                  f"at {record.get('at')!r})")
                if not failure_lines:
                    raise Failure(f"the run ended before the kill took effect (killed pid "
                                  f"{record['victim']} at {record['at']!r}); try a "
                                  "larger --steps")
                if not restarted or len(failure_lines) != 1:
                    raise Failure("the killed run did not restart once:\n" +
                                  "\n".join(job.lines[-25:]))
                row("tf.data worker SIGKILL", "tf.data straight", job.seconds,
                    states["tfdata"], final_state(scratch, "tfdata-killed", steps),
                    note=f"SIGKILL to worker pid {record['victim']} at "
                         f"{record['at'].split(' (')[0]!r}; {restarted.group(0)}")
            except Failure as e:
                failures.append(f"tf.data SIGKILL: {e}")
        if "generator" in args.cases or "resumable" in args.cases:
            for kind in ("generator", "resumable"):
                if kind not in args.cases:
                    continue
                cfg = derived_config(args, scratch, kind)
                try:
                    job = run_job(args, scratch, cfg, f"{kind}-straight")
                    states[kind] = final_state(scratch, f"{kind}-straight", steps)
                    rows.append((f"{kind} straight", "-", "", "", f"{job.seconds:.1f}",
                                 "", ""))
                    secs, resumed = stopped_and_resumed(kind, f"{kind}-resumed", cfg,
                                                        verbose=True)
                    notes = [f"worker {m.group(1)}: {m.group(2)}" for m in (
                        re.search(r"on worker (\d+): (replayed \d+ batches in \S+ s|"
                                  r"resumed at batch \d+)", ln) for ln in resumed.lines)
                             if m]
                    row(f"{kind} {half} + resume", f"{kind} straight", secs,
                        states[kind], final_state(scratch, f"{kind}-resumed", steps),
                        note="; ".join(notes) or "no replay/resume line in the log")
                    if kind == "generator" and not any("replayed" in n for n in notes):
                        failures.append("generator: no 'replayed N batches' line")
                    if kind == "resumable" and any("replayed" in n for n in notes):
                        failures.append("resumable: it replayed batches")
                except Failure as e:
                    failures.append(f"{kind}: {e}")
            if "generator" in states and "resumable" in states:
                row("resumable straight", "generator straight", 0.0,
                    states["generator"], states["resumable"],
                    note="the same batches (start_batch=0)")
        if "control" in args.cases:
            cfg = derived_config(args, scratch, "tfdata", input_position="restart")
            try:
                secs, _ = stopped_and_resumed("tfdata", "control-restart", cfg)
                row(f"control: restart {half} + resume", "tf.data straight", secs,
                    states["tfdata"], final_state(scratch, "control-restart", steps),
                    note="input_position: restart; must differ", expect_equal=False)
            except Failure as e:
                failures.append(f"control: {e}")
    except Failure as e:
        failures.append(str(e))
    finally:
        shutil.rmtree(args.ray_tmp, ignore_errors=True)
        if args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    heads = ("case", "compared with", "counts equal", "max |w diff|", "wall s",
             "result", "note")
    print()
    print_table(heads, rows)
    print()
    print(f"{steps} steps, full every {args.every}, {WORKERS} workers x batch {BATCH}; "
          f"counts exact, weights within {ATOL:g}; wall s: the job(s) of the row, "
          f"start-up included; total {time.perf_counter() - t_start:.0f} s")
    for f in failures:
        print(f"FAIL: {f}")
    print("all cases PASS" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
