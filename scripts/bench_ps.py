#!/usr/bin/env python
"""Benchmarks parameter servers (issue 23) against replicated tables.

Every job is ``python -m jobs.train`` on the wide-and-deep example
(``distributed.examples.wide_deep``: a partitioned ``rows`` x ``--dim``
float32 id table in ``--table-parts`` parts, Adagrad, 2 CPU workers), run as a user
runs it, in its own local Ray; a sampler reads every process of the job each
``--sample`` seconds and keeps the peak resident memory of each actor kind by
its process title (``ray::Worker``, ``ray::Coordinator``,
``ray::ParameterServer``).

Parts (``--parts``, comma-separated, default all):

* ``steps``: for each of ``--rows`` (the first is the memory baseline), the
  replicated run (``parameter_servers: 0``) and the PS run
  (``parameter_servers: 2``), alternating; steady steps/s (the progress
  chunks but the first, start-up, and the last, which holds the final
  checkpoint), peak RSS per actor kind, and CPU milliseconds per
  step per actor kind over the same steps (on a machine whose cores the
  run saturates, their sums bound the ratio). Targets: PS >= 0.5x the
  replicated steps/s at every size; with the table on the servers, no Worker
  and not the Coordinator grows by more than a quarter of the table's bytes
  over the baseline size.
* ``save``: a ``--save-rows`` table's full checkpoint (the table and Adagrad's
  accumulator: 2x the table's bytes) written by 1, 2 and 4 servers vs the
  coordinator path (replicated: rank 0's snapshot handed through the object
  store, written by the coordinator); the catalog's ``save_seconds`` (median
  of the run's full checkpoints) and, for the replicated path, also rank 0's
  hand-off, which the servers do not have. Target: 4 servers <= 0.5x the time
  of 1 where the cores exist (this machine's 2 cannot show it).

With ``--servers-apart`` each job runs on core 0 and its parameter servers'
threads are moved to the other cores, as servers on nodes of their own run
(``ps_resources``): the replicated run has core 0 alone, the PS run core 0
for the same workers plus the servers' cores. Without it every process of
both runs shares every core, and a PS step's extra CPU (TF's gRPC runtime
in the workers and servers) slows its workers too.

    python scripts/bench_ps.py                              # ~10 minutes on 2 cores
    python scripts/bench_ps.py --rows 2000,1000000,4000000 --save-rows 4194304 --dim 64
    python scripts/bench_ps.py --parts steps --table-parts 2 --rows 2000,1000000 \
        --ps-only-rows 4000000 --servers-apart          # 24 GiB, 2 cores
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchlib import PY, ROOT, Table, log  # noqa: E402

# Targets: never change these to make a run pass.
T_STEPS = 0.5     # PS steps/s / replicated steps/s, at least
T_GROWTH = 0.25   # worker and coordinator growth over the baseline, in table bytes, at most
T_SAVE_4_VS_1 = 0.5  # save seconds with 4 servers / with 1, at most (needs the cores)

KINDS = ("Worker", "Coordinator", "ParameterServer")


def job_config(args, scratch: str, name: str, rows: int, servers: int, steps: int,
               full_every: int) -> dict:
    return {
        "model": "distributed.examples.wide_deep:wide_deep_model_fn",
        "input": "distributed.examples.wide_deep:clicks_input_fn",
        "model_params": {"hash_buckets": rows, "embedding_dim": args.dim,
                         "partitions": args.table_parts, "cross_buckets": 1000,
                         "hidden": [64, 32]},
        "optimizer": {"name": "adagrad", "learning_rate": 0.1},
        "batch_size": args.batch_size, "workers": 2, "cpus_per_worker": 0.5,
        "parameter_servers": servers,
        # Ray's share only (a server's TF threads are its own): 4 servers
        # must fit a 2-core machine beside 2 workers and the coordinator.
        "ps_cpus": round(0.6 / max(servers, 1), 3), "steps": steps,
        "log_every": max(1, steps // args.chunks), "collective_timeout": 300.0,
        "selection": {"policy": "trainable"},
        "checkpoint": {"serving_every": 0, "full_every": full_every},
        "retention": {"full": {"keep_last": 1}},
        "storage": os.path.join(scratch, "runs"), "run": name,
    }


def _actors(pid: int) -> list:
    """``(kind, process)`` of the job's actors (by process title)."""
    import psutil
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            title = p.cmdline()[0] if p.cmdline() else ""
        except psutil.Error:
            continue
        kind = next((k for k in KINDS if title.startswith(f"ray::{k}")), None)
        if kind:
            found.append((kind, p))
    return found


def _cpu_by_kind(pid: int) -> dict:
    """CPU seconds (user + system) so far of each actor kind, all processes."""
    import psutil
    total: dict = {}
    for kind, p in _actors(pid):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total[kind] = total.get(kind, 0.0) + t.user + t.system
    return total


def _pin(pid: int, cores: set) -> None:
    """Every thread of process ``pid`` onto ``cores`` (a process's affinity
    is per thread: the ones it has started so far)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            if os.sched_getaffinity(tid) != cores:
                os.sched_setaffinity(tid, cores)
        except OSError:  # the thread ended
            continue


def _sample(pid: int, peaks: dict, stop: threading.Event, every: float,
            server_cores: set | None = None) -> None:
    import psutil
    while not stop.is_set():
        try:
            actors = _actors(pid)
        except psutil.Error:
            return
        for kind, p in actors:
            try:
                peaks[kind] = max(peaks.get(kind, 0), p.memory_info().rss)
            except psutil.Error:
                continue
            if server_cores and kind == "ParameterServer":
                _pin(p.pid, server_cores)
        stop.wait(every)


PROGRESS = re.compile(r"step (\d+)/\d+\s+mean loss \S+\s+([\d.]+) steps/s")


def run_job(args, scratch: str, config: dict) -> dict:
    """``python -m jobs.train`` on ``config``: steady steps/s, peak RSS and
    steady CPU milliseconds per step by actor kind, the full checkpoints'
    save seconds."""
    import yaml
    path = os.path.join(scratch, f"{config['run']}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    ray_tmp = tempfile.mkdtemp(prefix="bray", dir="/tmp")
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    peaks: dict = {}
    stop = threading.Event()
    command = [PY, "-m", "jobs.train", "--config", path]
    server_cores = None
    if args.servers_apart:  # the job on core 0; its servers' threads moved off it
        command = ["taskset", "-c", "0"] + command
        server_cores = set(range(1, os.cpu_count() or 2))
    proc = subprocess.Popen(command, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=_sample, args=(proc.pid, peaks, stop, args.sample,
                                                     server_cores), daemon=True)
    sampler.start()
    killer = threading.Timer(args.timeout, proc.kill)
    killer.start()
    lines, progress = [], []  # (step, steps/s, CPU by kind) at each progress line
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = PROGRESS.match(line)
            if m:
                progress.append((int(m.group(1)), float(m.group(2)),
                                 _cpu_by_kind(proc.pid)))
        proc.wait()
    finally:
        killer.cancel()
        stop.set()
        sampler.join(5)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{config['run']} exited {proc.returncode}:\n"
                           + "\n".join(lines[-25:]))
    chunks = [(step - prev, rate) for (step, rate, _), prev in
              zip(progress, [0] + [step for step, _, _ in progress])]
    # Steady: not the first chunk (start-up) nor the last, which holds the
    # final full checkpoint's snapshot and save (seconds for a big table).
    steady = chunks[1:-1] if len(chunks) >= 3 else chunks[1:] or chunks
    sps = sum(n for n, _ in steady) / sum(n / s for n, s in steady)
    # CPU per step over the same chunks (from the first progress line to the
    # one before the last).
    cpu_ms = {}
    if len(progress) >= 3:
        (s0, _, c0), (s1, _, c1) = progress[0], progress[-2]
        cpu_ms = {k: 1e3 * (c1[k] - c0.get(k, 0.0)) / (s1 - s0) for k in c1}
    saves = [float(m.group(1)) for m in (re.search(
        r"committed full checkpoint at step \d+ \([\d.]+ MiB, \d+ shard\(s\), ([\d.]+)s",
        line) for line in lines) if m]
    return {"sps": sps, "peaks": peaks, "cpu_ms": cpu_ms, "saves": saves, "lines": lines}


def cpu_line(r: dict) -> str:
    """CPU milliseconds per step by actor kind, and their sum."""
    ms = r["cpu_ms"]
    return (", ".join(f"{k} {v:.1f}" for k, v in sorted(ms.items()))
            + f"; all {sum(ms.values()):.1f}") if ms else "n/a"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def part_steps(args, scratch: str, table: Table) -> None:
    rows_list = [int(r) for r in args.rows.split(",")]
    ps_only = [int(r) for r in args.ps_only_rows.split(",") if r]
    results: dict = {}
    for rows in rows_list + ps_only:
        for servers in ((2,) if rows in ps_only else (0, 2)):
            name = f"steps-{rows}-{servers}"
            log(f"{name}: {rows} rows x {args.dim}, parameter_servers {servers}")
            r = run_job(args, scratch, job_config(args, scratch, name, rows, servers,
                                                  args.steps, 0))
            results[rows, servers] = r
            log(f"  {r['sps']:.1f} steps/s; peak RSS "
                + ", ".join(f"{k} {gib(v)}" for k, v in sorted(r["peaks"].items()))
                + f"; CPU ms per step: {cpu_line(r)}")
    base = rows_list[0]
    for rows in ps_only:  # the replicated run would not fit this machine
        ps, rep = results[rows, 2], results[rows_list[-1], 0]
        table.add(f"steps/s PS at {rows} rows vs replicated at {rows_list[-1]}",
                  f"{ps['sps']:.1f}", f"{rep['sps']:.1f}",
                  f"{ps['sps'] / rep['sps']:.2f}x", f">= {T_STEPS}x",
                  ps["sps"] / rep["sps"] >= T_STEPS)
        table_bytes = (rows - base) * args.dim * 4
        for kind in KINDS:
            table.add(f"peak RSS {kind}, {rows} rows, 2 servers",
                      gib(ps["peaks"].get(kind, 0)), "", "", "", None)
        for kind in ("Worker", "Coordinator"):
            grown = ps["peaks"].get(kind, 0) - results[base, 2]["peaks"].get(kind, 0)
            table.add(f"{kind} growth {base}->{rows} rows, PS run", gib(grown),
                      f"table {gib(table_bytes)}", f"{grown / table_bytes:.2f}x table",
                      f"<= {T_GROWTH}x", grown / table_bytes <= T_GROWTH)
    for rows in rows_list:
        rep, ps = results[rows, 0], results[rows, 2]
        ratio = ps["sps"] / rep["sps"]
        table.add(f"steps/s PS vs replicated, {rows} rows", f"{ps['sps']:.1f}",
                  f"{rep['sps']:.1f}", f"{ratio:.2f}x", f">= {T_STEPS}x", ratio >= T_STEPS)
        if ps["cpu_ms"] and rep["cpu_ms"]:
            ps_cpu, rep_cpu = sum(ps["cpu_ms"].values()), sum(rep["cpu_ms"].values())
            table.add(f"CPU ms per step, all actors, PS vs replicated, {rows} rows",
                      f"{ps_cpu:.1f}", f"{rep_cpu:.1f}", f"{ps_cpu / rep_cpu:.2f}x", "",
                      None)
            worker = ps["cpu_ms"].get("Worker", 0) / rep["cpu_ms"].get("Worker", 1)
            table.add(f"CPU ms per step, Workers, PS vs replicated, {rows} rows",
                      f"{ps['cpu_ms'].get('Worker', 0):.1f}",
                      f"{rep['cpu_ms'].get('Worker', 0):.1f}", f"{worker:.2f}x", "", None)
        for kind in KINDS:
            for servers in (0, 2):
                peak = results[rows, servers]["peaks"].get(kind)
                if peak is not None:
                    table.add(f"peak RSS {kind}, {rows} rows, {servers} servers",
                              gib(peak), "", "", "", None)
        if rows == base:
            continue
        table_bytes = (rows - base) * args.dim * 4
        for kind in ("Worker", "Coordinator"):
            grown = ps["peaks"].get(kind, 0) - results[base, 2]["peaks"].get(kind, 0)
            share = grown / table_bytes
            table.add(f"{kind} growth {base}->{rows} rows, PS run", gib(grown),
                      f"table {gib(table_bytes)}", f"{share:.2f}x table",
                      f"<= {T_GROWTH}x", share <= T_GROWTH)
            grown_rep = rep["peaks"].get(kind, 0) - results[base, 0]["peaks"].get(kind, 0)
            table.add(f"{kind} growth {base}->{rows} rows, replicated", gib(grown_rep),
                      f"table {gib(table_bytes)}",
                      f"{grown_rep / table_bytes:.2f}x table", "", None)


def part_save(args, scratch: str, table: Table) -> None:
    rows = args.save_rows
    ckpt = 2 * rows * args.dim * 4  # the table and its accumulator
    seconds: dict = {}
    for servers in [int(n) for n in args.save_servers.split(",")]:
        name = f"save-{servers}"
        log(f"{name}: a {gib(ckpt)} full checkpoint, parameter_servers {servers}")
        r = run_job(args, scratch, job_config(args, scratch, name, rows, servers,
                                              args.save_steps, args.save_steps // 2))
        seconds[servers] = statistics.median(r["saves"])
        log(f"  save seconds {r['saves']}; peak RSS "
            + ", ".join(f"{k} {gib(v)}" for k, v in sorted(r["peaks"].items())))
    for servers in (1, 2, 4):
        if servers in seconds and 0 in seconds:
            table.add(f"full save {gib(ckpt)}, {servers} server(s) vs coordinator path",
                      f"{seconds[servers]:.2f}s", f"{seconds[0]:.2f}s",
                      f"{seconds[servers] / seconds[0]:.2f}x", "", None)
        elif servers in seconds:
            table.add(f"full save {gib(ckpt)}, {servers} server(s)",
                      f"{seconds[servers]:.2f}s", "", "", "", None)
    if 4 not in seconds or 1 not in seconds:
        return
    ratio = seconds[4] / seconds[1]
    cores = os.cpu_count() or 1
    table.add("full save, 4 servers vs 1", f"{seconds[4]:.2f}s", f"{seconds[1]:.2f}s",
              f"{ratio:.2f}x", f"<= {T_SAVE_4_VS_1}x" + ("" if cores >= 8 else
                                                        f" (needs cores; {cores} here)"),
              ratio <= T_SAVE_4_VS_1 if cores >= 8 else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="steps,save")
    p.add_argument("--rows", default="2000,250000,1000000",
                   help="table rows for the steps part; the first is the memory baseline")
    p.add_argument("--ps-only-rows", default="",
                   help="sizes run with servers only (a replicated run would not fit "
                        "the machine's memory), compared with the largest --rows")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--table-parts", type=int, default=4, help="the table's partitions")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--chunks", type=int, default=5,
                   help="progress chunks a run; the steady figures leave out the "
                        "first (start-up) and the last (the final checkpoint)")
    p.add_argument("--save-rows", type=int, default=1_000_000)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--save-servers", default="0,1,2,4",
                   help="servers per save run; 0 is the coordinator path (replicated)")
    p.add_argument("--sample", type=float, default=0.5)
    p.add_argument("--servers-apart", action="store_true",
                   help="run each job on core 0 and its parameter servers on the "
                        "other cores, as servers on nodes of their own would run: "
                        "the replicated run gets core 0 alone")
    p.add_argument("--timeout", type=float, default=1200)
    args = p.parse_args()
    which = set(args.parts.split(","))
    scratch = tempfile.mkdtemp(prefix="bench-ps-")
    table = Table()
    try:
        if "steps" in which:
            part_steps(args, scratch, table)
        if "save" in which:
            part_save(args, scratch, table)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table.print()
    return 1 if table.fails else 0


if __name__ == "__main__":
    sys.exit(main())
