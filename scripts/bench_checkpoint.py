#!/usr/bin/env python
"""Benchmarks the checkpoint path against its baselines, in one run.

Measures, side by side on the same filesystem and the same graph:

* sharded save throughput of ``CheckpointStore.save`` (trainable selection,
  incl. manifest, fsync and catalog commit) vs a stock single-file
  ``tf.compat.v1.train.Saver`` save of the same variables followed by an fsync
  of its files, and vs a plain sequential write (large writes + fsync) of the
  same number of bytes; plus a sweep over shard counts;
* serving checkpoint bytes on disk vs selected tensor bytes, and full (policy
  ``all``, incl. Adam slots) vs serving bytes;
* ``verify_checkpoint`` throughput, warm and cold page cache;
* ``Catalog.latest`` / ``Catalog.table`` latency with ``--catalog-rows`` rows.

Prints a table with PASS/FAIL against the project's targets. Throughputs are in
decimal GB/s (1e9 bytes). Run as root to drop the page cache between
measurements (``sync; echo 3 > /proc/sys/vm/drop_caches``); otherwise it says so.

    python scripts/bench_checkpoint.py --gib 1 --tensors 32 --repeats 3
"""

from __future__ import annotations

import glob
import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from _benchlib import print_table  # noqa: E402

GB = 1e9
KIB = 1024
SWEEP_SHARDS = (1, 2, 4, 8)

# Targets (never change these to make a run pass).
T_SAVE_VS_SAVER = 1.5
T_SAVE_VS_SEQ = 0.8
T_BYTES_FACTOR, T_BYTES_SLACK = 1.01, 64 * KIB
T_FULL_VS_SERVING = 2.9
T_VERIFY_GBPS = 1.0
T_CATALOG_MS = 100.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0,
                   help="GiB of float32 trainable variables (default 1.0)")
    p.add_argument("--tensors", type=int, default=32,
                   help="number of trainable tensors, varied sizes (default 32)")
    p.add_argument("--shards", type=int, default=None,
                   help="shards of the measured sharded save (default: the "
                        "CheckpointWriter's default for the selected bytes)")
    p.add_argument("--dir", default=None,
                   help="parent directory for the benchmark's files (default: a "
                        "temp dir under /tmp); a fresh subdirectory is created "
                        "and removed at the end")
    p.add_argument("--repeats", type=int, default=3,
                   help="repeats per measurement; medians are reported (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="unmeasured warm-up rounds of all writers first (default 1)")
    p.add_argument("--catalog-rows", type=int, default=10000,
                   help="committed catalog rows for the catalog timing (default 10000)")
    p.add_argument("--catalog-mode", choices=("fast", "commit"), default="fast",
                   help="fast: write the row files directly and compact exactly "
                        "where Catalog.commit would (no per-row fsync); commit: "
                        "call Catalog.commit for every row (slow, durable)")
    args = p.parse_args(argv)
    if (args.gib <= 0 or args.tensors < 1 or args.repeats < 1
            or args.catalog_rows < 1 or args.warmup < 0):
        p.error("--gib, --tensors, --repeats and --catalog-rows must be positive")
    if args.shards is not None and args.shards < 1:
        p.error("--shards must be a positive integer")
    if not 20 <= args.tensors <= 50:
        print(f"note: --tensors {args.tensors} is outside the intended 20-50",
              file=sys.stderr)
    return args


# -- page cache and files ---------------------------------------------------

_DROP_OK: bool | None = None


def drop_caches() -> bool:
    """sync, then drop the page cache; returns whether dropping worked."""
    global _DROP_OK
    os.sync()
    if _DROP_OK is False:
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        _DROP_OK = True
    except OSError as e:
        if _DROP_OK is None:
            print(f"note: cannot drop the page cache ({e}); cold numbers are "
                  "not cold and writes may be absorbed by the cache",
                  file=sys.stderr)
        _DROP_OK = False
    return _DROP_OK


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(dirpath, n))
    return total


def fsync_files_and_dir(directory: str) -> None:
    from distributed.checkpoint.layout import fsync_dir, fsync_file
    for n in os.listdir(directory):
        p = os.path.join(directory, n)
        if os.path.isfile(p):
            fsync_file(p)
    fsync_dir(directory)


def rm(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def median(xs):
    return statistics.median(xs)


# -- the model ---------------------------------------------------------------

def tensor_shapes(gib: float, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` 2-D shapes of varied sizes totalling about ``gib`` GiB of float32."""
    total = int(gib * 2**30) // 4
    w = np.random.default_rng(seed).lognormal(0.0, 1.0, n)
    shapes = []
    for x in w / w.sum():
        elems = max(1, int(total * x))
        cols = 1024 if elems >= 1024 * 16 else 16
        shapes.append((max(1, round(elems / cols)), cols))
    return shapes


def build_graph(tf, shapes):
    graph = tf.Graph()
    with graph.as_default():
        init = tf.compat.v1.random_uniform_initializer(-0.05, 0.05, seed=1)
        variables = []
        for i, shape in enumerate(shapes):
            with tf.compat.v1.variable_scope(f"layer{i:02d}"):
                variables.append(tf.compat.v1.get_variable(
                    "w", shape=shape, dtype=tf.float32, initializer=init))
        loss = tf.add_n([tf.reduce_mean(tf.square(v)) for v in variables])
        train_op = tf.compat.v1.train.AdamOptimizer(1e-3).minimize(loss)
        init_op = tf.compat.v1.global_variables_initializer()
    return graph, variables, loss, train_op, init_op


# -- measurements ------------------------------------------------------------

def seq_write(path: str, nbytes: int, buf: memoryview) -> tuple[float, float]:
    """(seconds of the writes, seconds incl. fsync) of writing ``nbytes`` into
    one new file with large writes + fsync of the file and its directory."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            n = os.write(fd, buf[:min(left, len(buf))])
            left -= n
        t_write = time.perf_counter() - start
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    return t_write, time.perf_counter() - start


def stock_save(tf, graph, saver, sess, directory: str) -> tuple[float, float]:
    """(seconds without fsync, seconds incl. fsync) of a stock Saver save."""
    os.makedirs(directory)
    prefix = os.path.join(directory, "model.ckpt")
    start = time.perf_counter()
    with graph.as_default():
        saver.save(sess, prefix, write_meta_graph=False, write_state=False)
    t_save = time.perf_counter() - start
    fsync_files_and_dir(directory)
    return t_save, time.perf_counter() - start


_MARKS: list[tuple[str, float]] = []


def store_save(store, writer, sess, step: int, tier: str, spec_json: str,
               phases: dict | None = None) -> float:
    """Seconds of one ``CheckpointStore.save``; per-phase seconds into ``phases``."""
    _MARKS.clear()
    start = time.perf_counter()
    store.save(writer, sess, step, tier, spec_json)
    end = time.perf_counter()
    if phases is not None:
        prev = start
        for name, t in _MARKS:
            phases.setdefault(name, []).append(t - prev)
            prev = t
    return end - start


def forget(store, step: int, tier: str) -> None:
    """Deletes a committed checkpoint the way retention does (row, then dir)."""
    store.catalog.remove(step, tier)
    rm(store.layout.checkpoint_dir(tier, step))


def catalog_bench(root: str, rows: int, mode: str, repeats: int):
    from distributed.checkpoint import catalog as catmod
    from distributed.checkpoint import catalog_format
    from distributed.checkpoint import layout as laymod
    from distributed.checkpoint.catalog import Catalog, CatalogEntry, utc_now

    lay = laymod.RunLayout(root, "catalog-bench")
    os.makedirs(lay.catalog_dir, exist_ok=True)
    cat = Catalog(lay)

    def entry(step):
        return CatalogEntry(
            run=lay.run, step=step, tier="serving",
            path=lay.relative_checkpoint_path("serving", step), num_tensors=32,
            num_bytes=2**30, num_shards=4, save_seconds=1.0,
            committed_at=utc_now(), metrics={"loss": 1.0 / step, "acc": 0.5},
            selection='{"exclude": [], "include": [], "policy": "trainable"}',
            manifest_crc32c=0)

    steps = [100 * (i + 1) for i in range(rows)]
    start = time.perf_counter()
    commit_times = []
    if mode == "commit":
        for s in steps:
            t0 = time.perf_counter()
            cat.commit(entry(s))
            commit_times.append(time.perf_counter() - t0)
    else:
        # Exactly the state `rows` commits leave: the compacted copy holds the
        # first floor(rows/64)*64 rows (the last compaction), the rest are row
        # files only. Row files are written without per-file fsync; the tail
        # goes through Catalog.commit for real (timed, for information).
        n_compacted = (rows // catmod.COMPACT_EVERY) * catmod.COMPACT_EVERY
        for s in steps[:n_compacted]:
            data = catalog_format.table_bytes(catalog_format.to_table([entry(s)]))
            name = laymod.catalog_row_name(s, "serving", laymod.bytes_crc32c(data))
            with open(os.path.join(lay.catalog_dir, name), "wb") as f:
                f.write(data)
        if n_compacted:
            cat.compact()
        os.sync()
        for s in steps[n_compacted:]:
            t0 = time.perf_counter()
            cat.commit(entry(s))
            commit_times.append(time.perf_counter() - t0)
    fill_s = time.perf_counter() - start

    def timed(fn, n):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    n = max(5, repeats)
    latest = cat.latest("serving")
    assert latest is not None and latest.step == steps[-1], latest
    assert cat.table().num_rows == rows
    res = {
        "fill_s": fill_s,
        "commit_ms": median(commit_times) * 1e3 if commit_times else None,
        "n_commit": len(commit_times),
        "latest_ms": median(timed(lambda: cat.latest("serving"), n)) * 1e3,
        "table_ms": median(timed(lambda: cat.table(), n)) * 1e3,
    }
    for compacted in glob.glob(os.path.join(lay.catalog_dir, catmod.COMPACTED_DIR,
                                            "catalog.*.parquet")):
        os.unlink(compacted)
    res["latest_nocomp_ms"] = median(timed(lambda: cat.latest("serving"), n)) * 1e3
    t_nocomp = timed(lambda: cat.table(), 1)
    res["table_nocomp_ms"] = median(t_nocomp) * 1e3
    rm(lay.root)
    return res


# -- main --------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import tensorflow as tf
    from distributed.checkpoint import (CheckpointStore, CheckpointWriter,
                                        SelectionSpec, select_variables,
                                        session_config, verify_checkpoint)
    from distributed.checkpoint import sharding

    parent = args.dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench_checkpoint-", dir=parent)
    try:
        return _run(args, tf, root, t_start, CheckpointStore, CheckpointWriter,
                    SelectionSpec, select_variables, session_config,
                    verify_checkpoint, sharding)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(args, tf, root, t_start, CheckpointStore, CheckpointWriter, SelectionSpec,
         select_variables, session_config, verify_checkpoint, sharding) -> int:
    shapes = tensor_shapes(args.gib, args.tensors)
    graph, _, _, train_op, init_op = build_graph(tf, shapes)
    spec = SelectionSpec(policy="trainable")
    spec_all = SelectionSpec(policy="all")
    selected, _ = select_variables(graph, spec)
    all_vars, _ = select_variables(graph, spec_all)

    default_writer = CheckpointWriter(selected)
    main_shards = args.shards or default_writer.num_shards
    shard_counts = sorted(set(SWEEP_SHARDS) | {main_shards})
    writers = {k: (default_writer if k == default_writer.num_shards and
                   args.shards is None else CheckpointWriter(selected, num_shards=k))
               for k in shard_counts}
    main_writer = writers[main_shards]
    sel_bytes = main_writer.total_bytes
    with graph.as_default():
        stock_saver = tf.compat.v1.train.Saver(var_list=selected, max_to_keep=None,
                                               save_relative_paths=True)
    full_writer = CheckpointWriter(all_vars)

    sess_shards = max(shard_counts + [full_writer.num_shards])
    sess = tf.compat.v1.Session(graph=graph, config=session_config(sess_shards))
    t0 = time.perf_counter()
    sess.run(init_op)
    sess.run(train_op)  # one Adam step: the slots hold real values
    t_init = time.perf_counter() - t0

    store = CheckpointStore(
        root, "bench", on_phase=lambda p: _MARKS.append((p, time.perf_counter())))
    store.open()
    scratch = os.path.join(root, "scratch")
    os.makedirs(scratch)
    buf = memoryview(np.random.default_rng(2).integers(
        0, 256, 64 * 2**20, dtype=np.uint8).tobytes())

    print(f"model: {len(shapes)} trainable float32 tensors, {sel_bytes / 2**30:.3f} "
          f"GiB selected (sizes {min(np.prod(s) for s in shapes) * 4 / 2**20:.2f}"
          f"..{max(np.prod(s) for s in shapes) * 4 / 2**20:.1f} MiB), "
          f"{len(all_vars)} variables in all; init + 1 Adam step {t_init:.1f}s")
    print(f"session: session_config({sess_shards}); writer default shards = "
          f"{default_writer.num_shards} (sharding.default_num_shards: 1 per "
          f"{sharding.DEFAULT_BYTES_PER_SHARD // 2**20} MiB); measured save uses "
          f"{main_shards}; storage {root}; cpus {os.cpu_count()}")

    # Rounds interleave every writer so drift hits all of them alike, and the
    # order rotates each round so no writer always goes first after the
    # previous round's deletions. Round 0 is an unmeasured warm-up: on this
    # kind of (virtual) disk the first writes into fresh blocks run far slower
    # than later ones, whichever writer happens to do them.
    seq_t, seq_t_nofsync, stock_t, stock_t_nofsync = [], [], [], []
    save_t = {k: [] for k in shard_counts}
    phases = {k: {} for k in shard_counts}
    step = 0

    def do_seq(r, keep):
        p = os.path.join(scratch, f"seq-{r}")
        a, b = seq_write(p, sel_bytes, buf)
        rm(p)
        if keep:
            seq_t_nofsync.append(a)
            seq_t.append(b)

    def do_stock(r, keep):
        d = os.path.join(scratch, f"saver-{r}")
        a, b = stock_save(tf, graph, stock_saver, sess, d)
        rm(d)
        if keep:
            stock_t_nofsync.append(a)
            stock_t.append(b)

    def do_sharded(k):
        def fn(r, keep):
            nonlocal step
            step += 1
            t = store_save(store, writers[k], sess, step, "serving", spec.to_json(),
                           phases[k] if keep else None)
            forget(store, step, "serving")
            if keep:
                save_t[k].append(t)
        return fn

    jobs = [do_seq, do_stock] + [do_sharded(k) for k in shard_counts]
    for r in range(args.warmup + args.repeats):
        keep = r >= args.warmup
        shift = r % len(jobs)
        for job in jobs[shift:] + jobs[:shift]:
            drop_caches()
            job(r, keep)
    dropped = bool(_DROP_OK)

    # One kept serving checkpoint (bytes, verify) and one full checkpoint.
    step += 1
    drop_caches()
    store_save(store, main_writer, sess, step, "serving", spec.to_json())
    serving_step = step
    serving_dir = store.layout.checkpoint_dir("serving", serving_step)
    serving_bytes = dir_bytes(serving_dir)
    serving_files = sorted(os.listdir(serving_dir))
    step += 1
    drop_caches()
    full_s = store_save(store, full_writer, sess, step, "full", spec_all.to_json())
    full_bytes = dir_bytes(store.layout.checkpoint_dir("full", step))
    full_tensor_bytes = full_writer.total_bytes
    forget(store, step, "full")

    verify_warm, verify_cold = [], []
    rep = verify_checkpoint(serving_dir)  # warms the cache
    assert rep.ok and rep.num_bytes == sel_bytes, rep
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        verify_checkpoint(serving_dir)
        verify_warm.append(time.perf_counter() - t0)
    if dropped:
        for _ in range(args.repeats):
            drop_caches()
            t0 = time.perf_counter()
            verify_checkpoint(serving_dir)
            verify_cold.append(time.perf_counter() - t0)
    forget(store, serving_step, "serving")
    sess.close()

    cat = catalog_bench(root, args.catalog_rows, args.catalog_mode, args.repeats)
    total_s = time.perf_counter() - t_start

    # -- report -------------------------------------------------------------
    gbps = lambda secs: sel_bytes / GB / median(secs)  # noqa: E731
    seq_gbps, stock_gbps = gbps(seq_t), gbps(stock_t)
    main_gbps = gbps(save_t[main_shards])
    rows = []

    def row(name, value, baseline, ratio, target, ok):
        rows.append((name, value, baseline, ratio, target,
                     "" if ok is None else ("PASS" if ok else "FAIL")))

    r1 = main_gbps / stock_gbps
    row(f"sharded save K={main_shards} vs stock Saver+fsync",
        f"{main_gbps:.2f} GB/s", f"{stock_gbps:.2f} GB/s", f"{r1:.2f}x",
        f">= {T_SAVE_VS_SAVER}x", r1 >= T_SAVE_VS_SAVER)
    r2 = main_gbps / seq_gbps
    row(f"sharded save K={main_shards} vs seq write+fsync",
        f"{main_gbps:.2f} GB/s", f"{seq_gbps:.2f} GB/s", f"{r2:.2f}x",
        f">= {T_SAVE_VS_SEQ}x", r2 >= T_SAVE_VS_SEQ)
    limit = T_BYTES_FACTOR * sel_bytes + T_BYTES_SLACK
    row("serving bytes on disk vs tensor bytes", f"{serving_bytes:,}",
        f"{sel_bytes:,}", f"{serving_bytes / sel_bytes:.5f}x",
        f"<= {limit:,.0f}", serving_bytes <= limit)
    r3 = full_bytes / serving_bytes
    row("full ckpt bytes vs serving bytes", f"{full_bytes:,}", f"{serving_bytes:,}",
        f"{r3:.3f}x", f">= {T_FULL_VS_SERVING}x", r3 >= T_FULL_VS_SERVING)
    vw = gbps(verify_warm)
    row("verify_checkpoint, warm cache", f"{vw:.2f} GB/s", "", "",
        f">= {T_VERIFY_GBPS} GB/s", vw >= T_VERIFY_GBPS)
    if verify_cold:
        vc = gbps(verify_cold)
        row("verify_checkpoint, cold cache", f"{vc:.2f} GB/s", "", "",
            f">= {T_VERIFY_GBPS} GB/s", vc >= T_VERIFY_GBPS)
    else:
        row("verify_checkpoint, cold cache", "n/a (no drop_caches)", "", "", "", None)
    n = args.catalog_rows
    row(f"Catalog.latest('serving'), {n} rows", f"{cat['latest_ms']:.1f} ms", "", "",
        f"<= {T_CATALOG_MS:.0f} ms", cat["latest_ms"] <= T_CATALOG_MS)
    row(f"Catalog.table(), {n} rows", f"{cat['table_ms']:.1f} ms", "", "",
        f"<= {T_CATALOG_MS:.0f} ms", cat["table_ms"] <= T_CATALOG_MS)
    # information only
    row("  stock Saver without fsync (info)", f"{gbps(stock_t_nofsync):.2f} GB/s",
        "", f"{main_gbps / gbps(stock_t_nofsync):.2f}x", "", None)
    for k in shard_counts:
        row(f"  sweep: sharded save K={k} (info)", f"{gbps(save_t[k]):.2f} GB/s",
            f"{stock_gbps:.2f} GB/s", f"{gbps(save_t[k]) / stock_gbps:.2f}x", "", None)
    row("  full ckpt save, all vars (info, 1 run)",
        f"{full_tensor_bytes / GB / full_s:.2f} GB/s", "", "", "", None)
    row("  latest(), compacted file deleted (info)",
        f"{cat['latest_nocomp_ms']:.1f} ms", "", "", "", None)
    row("  table(), compacted file deleted (info, 1 call)",
        f"{cat['table_nocomp_ms']:.1f} ms", "", "", "", None)

    heads = ("measure", "value", "baseline", "ratio", "target", "result")
    print()
    print_table(heads, rows)
    print()
    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    print(f"raw seconds (repeats={args.repeats} after {args.warmup} warm-up "
          f"round(s), median used): seq [{fmt(seq_t)}] "
          f"saver+fsync [{fmt(stock_t)}] saver [{fmt(stock_t_nofsync)}]")
    print("  " + "; ".join(f"K={k} [{fmt(save_t[k])}]" for k in shard_counts))
    print("store.save phases, median s (" + ", ".join(
        p for p in ("tensors_written", "manifest_written", "synced", "renamed",
                    "committed")) + "); seq write w/o fsync median "
          f"{median(seq_t_nofsync):.3f}s")
    for k in shard_counts:
        ph = phases[k]
        print(f"  K={k}: " + " / ".join(
            f"{median(ph[p]):.3f}" for p in ("tensors_written", "manifest_written",
                                             "synced", "renamed", "committed")))
    print(f"  verify warm [{fmt(verify_warm)}] cold [{fmt(verify_cold)}]")
    print(f"serving files: {', '.join(serving_files)}")
    print(f"page cache dropped between measurements: "
          f"{'yes' if dropped else 'NO (drop_caches failed)'}")
    print(f"catalog: {n} rows written in {cat['fill_s']:.1f}s via "
          + ("Catalog.commit for every row" if args.catalog_mode == "commit" else
             f"direct row files + Catalog.compact at the last multiple of 64, then "
             f"{cat['n_commit']} real Catalog.commit calls")
          + (f" (median commit {cat['commit_ms']:.1f} ms)" if cat["commit_ms"] else ""))
    fails = sum(r[5] == "FAIL" for r in rows)
    print(f"total {total_s:.0f}s; {fails} target(s) FAILED" if fails else
          f"total {total_s:.0f}s; all targets PASS")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
