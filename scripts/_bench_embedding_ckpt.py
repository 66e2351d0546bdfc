#!/usr/bin/env python
"""Benchmarks checkpoints of a large partitioned embedding table (issue 11).

A ``--ckpt-rows`` x ``--ckpt-dim`` float32 table (default 4,200,000 x 64 =
1.0 GiB) in ``--ckpt-parts`` parts (``fixed_size_partitioner``, default 8),
measured against baselines in the same run:

* save: our serving checkpoint (``CheckpointStore.save``: K shards written in
  parallel, slices balanced by bytes, manifest, fsync, commit) vs a stock
  ``tf.compat.v1.train.Saver(sharded=True)`` of the same variables, then an
  fsync of its files and directory (all parts live on one device, so the
  stock Saver writes one shard);
* restore into the same partitioning: ours (catalog row and manifest down
  the checksum chain, every slice CRC-checked as it is read, the table
  assembled and fed to the parts, as the restore job does) vs a stock
  ``Saver.restore`` of the stock checkpoint (no checksums);
* restore into another partitioning (``--ckpt-other-parts``, default 6) vs
  into the same one, for ours and for the stock Saver.

Each measurement repeats ``--ckpt-repeats`` times after one unmeasured warm-up
round; variants alternate and rotate their order each round; medians. The page
cache stays warm unless ``--drop-caches`` (root; it affects everyone on a
shared machine). Results are correct or the run fails: each restore's table is
compared with the trained one by CRC-32C.

    python scripts/_bench_embedding_ckpt.py                        # 1 GiB
    python scripts/_bench_embedding_ckpt.py --ckpt-rows 420000 --ckpt-repeats 2

``run(args)`` returns the table rows (``_benchlib.Table`` rows) for
``bench_embedding.py``; ``add_arguments(parser)`` adds this part's flags.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _benchlib import Table, log  # noqa: E402
from bench_checkpoint import drop_caches, fsync_files_and_dir  # noqa: E402

DEFAULTS = {"ckpt_rows": 4_200_000, "ckpt_dim": 64, "ckpt_parts": 8,
            "ckpt_other_parts": 6, "ckpt_shards": None, "ckpt_repeats": 3,
            "dir": None, "drop_caches": False}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags (prefixed, to sit beside ``bench_embedding``'s)."""
    p.add_argument("--ckpt-rows", type=int, default=DEFAULTS["ckpt_rows"],
                   help="table rows (default 4200000: 1.0 GiB at dim 64)")
    p.add_argument("--ckpt-dim", type=int, default=DEFAULTS["ckpt_dim"],
                   help="table columns (default 64)")
    p.add_argument("--ckpt-parts", type=int, default=DEFAULTS["ckpt_parts"],
                   help="parts of the trained table (default 8)")
    p.add_argument("--ckpt-other-parts", type=int, default=DEFAULTS["ckpt_other_parts"],
                   help="parts of the other restore graph; 0: unpartitioned (default 6)")
    p.add_argument("--ckpt-shards", type=int, default=None,
                   help="our writer's shards (default: its own, 1 per 256 MiB)")
    p.add_argument("--ckpt-repeats", type=int, default=DEFAULTS["ckpt_repeats"],
                   help="measured rounds; medians (default 3)")
    p.add_argument("--drop-caches", action="store_true",
                   help="drop the page cache before each measurement (root)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--dir", default=None, help="parent of the scratch directory")
    args = p.parse_args(argv)
    if min(args.ckpt_rows, args.ckpt_dim, args.ckpt_parts, args.ckpt_repeats) < 1 \
            or args.ckpt_other_parts < 0 or (args.ckpt_shards or 1) < 1:
        p.error("sizes, parts, shards and repeats must be positive")
    return args


def _opt(args, name):
    return getattr(args, name, DEFAULTS[name])


def _table_graph(tf, rows: int, dim: int, parts: int, init: bool):
    """A graph holding ``emb`` in ``parts`` parts (0: whole); returns
    ``(graph, parts list, initializer)``."""
    graph = tf.Graph()
    with graph.as_default():
        emb = tf.compat.v1.get_variable(
            "emb", [rows, dim],
            partitioner=tf.compat.v1.fixed_size_partitioner(parts) if parts else None,
            initializer=tf.compat.v1.random_uniform_initializer(-0.05, 0.05, seed=1)
            if init else tf.compat.v1.zeros_initializer())
        variables = list(emb) if parts else [emb]
        init_op = tf.compat.v1.global_variables_initializer()
    return graph, variables, init_op


class _Restorer:
    """One restore graph and both ways of filling it."""

    def __init__(self, tf, rows, dim, parts, stock_prefix):
        from distributed.checkpoint.partition import part_of
        from distributed.checkpoint.writer import session_config
        self.graph, self.variables, init = _table_graph(tf, rows, dim, parts, False)
        with self.graph.as_default():
            self.parts = [part_of(v) for v in self.variables]
            self.feeds = [tf.compat.v1.placeholder(tf.float32, v.shape)
                          for v in self.variables]
            self.assigns = [v.assign(ph, read_value=False)
                            for v, ph in zip(self.variables, self.feeds)]
            self.saver = tf.compat.v1.train.Saver(var_list=self.variables)
        self.sess = tf.compat.v1.Session(graph=self.graph, config=session_config(1))
        self.sess.run(init)
        self.stock_prefix = stock_prefix

    def ours(self, run_layout, step):
        """What the restore job does: row file, manifest, verified read, feed."""
        import numpy as np

        from distributed.checkpoint import slices
        from distributed.checkpoint.verify import read_committed_manifest, read_verified
        ckpt_dir, manifest = read_committed_manifest(run_layout, step, "serving")
        table = read_verified(ckpt_dir, manifest, ["emb"], lambda _: np.float32)["emb"]
        self.sess.run(self.assigns, {ph: table[slices.region(p.extents)]
                                     for ph, p in zip(self.feeds, self.parts)})

    def stock(self):
        with self.graph.as_default():
            self.saver.restore(self.sess, self.stock_prefix)

    def table_crc(self) -> int:
        return _table_crc(self.sess, self.variables)


def _table_crc(sess, variables) -> int:
    """CRC-32C of the whole table, its row blocks put in order."""
    import crc32c
    import numpy as np

    from distributed.checkpoint.partition import part_of
    blocks = sorted(zip(map(part_of, variables), sess.run(variables)),
                    key=lambda pv: pv[0].extents)
    return crc32c.crc32c(np.concatenate([v for _, v in blocks]).tobytes())


def _rounds(jobs: dict, repeats: int, drop: bool, cleanup=None) -> dict:
    """Runs every job once per round (warm-up round 0 unmeasured), rotating
    the order; ``cleanup[name]`` runs untimed after its job. Returns each
    job's measured seconds."""
    times = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(1 + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if drop:
                drop_caches()
            t0 = time.perf_counter()
            jobs[name]()
            if r:
                times[name].append(time.perf_counter() - t0)
            (cleanup or {}).get(name, lambda: None)()
    return times


def run(args) -> list[tuple]:
    """Measures; returns ``_benchlib.Table`` rows. ``args`` may lack any of
    this benchmark's options (``DEFAULTS`` apply)."""
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    parent = _opt(args, "dir") or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench_embedding_ckpt-", dir=parent)
    try:
        return _measure(tf, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _measure(tf, args, root: str) -> list[tuple]:
    from distributed.checkpoint import CheckpointStore, CheckpointWriter, session_config

    rows, dim = _opt(args, "ckpt_rows"), _opt(args, "ckpt_dim")
    parts, other = _opt(args, "ckpt_parts"), _opt(args, "ckpt_other_parts")
    repeats, drop = _opt(args, "ckpt_repeats"), _opt(args, "drop_caches")
    graph, variables, init = _table_graph(tf, rows, dim, parts, True)
    writer = CheckpointWriter(variables, num_shards=_opt(args, "ckpt_shards"))
    with graph.as_default():
        stock = tf.compat.v1.train.Saver(var_list=variables, sharded=True,
                                         max_to_keep=None, save_relative_paths=True)
    sess = tf.compat.v1.Session(graph=graph, config=session_config(writer.num_shards))
    sess.run(init)
    log(f"table {rows} x {dim} float32 = {rows * dim * 4 / 2**30:.2f} GiB in {parts} "
        f"parts; our writer: {writer.num_shards} shards; scratch {root}")
    store = CheckpointStore(root, "bench")
    store.open()
    stock_dir = os.path.join(root, "stock")
    saves, kept = _save_rounds(graph, sess, writer, stock, store, stock_dir, repeats, drop)
    want = _table_crc(sess, variables)
    sess.close()
    stock_prefix = os.path.join(stock_dir, "model.ckpt")
    same = _Restorer(tf, rows, dim, parts, stock_prefix)
    another = _Restorer(tf, rows, dim, other, stock_prefix)
    try:
        restores = _restore_rounds(same, another, store.layout, kept, want, repeats, drop)
    finally:
        for r in (same, another):
            r.sess.close()
    return _rows(saves, restores, rows * dim * 4, writer.num_shards, parts, other, drop,
                 _bytes_on_disk(store.layout.checkpoint_dir("serving", kept)),
                 _bytes_on_disk(stock_dir))


def _save_rounds(graph, sess, writer, stock, store, stock_dir, repeats, drop):
    """Times both saves (each deleted again untimed); then leaves one of each
    for the restores. Returns ``(seconds, step of our kept checkpoint)``."""
    step = [0]

    def ours_save():
        step[0] += 1
        store.save(writer, sess, step[0], "serving", "{}")

    def ours_forget():  # as retention deletes: the row, then the directory
        store.catalog.remove(step[0], "serving")
        shutil.rmtree(store.layout.checkpoint_dir("serving", step[0]))
        os.sync()

    def stock_save():
        os.makedirs(stock_dir)
        with graph.as_default():
            stock.save(sess, os.path.join(stock_dir, "model.ckpt"),
                       write_meta_graph=False, write_state=False)
        fsync_files_and_dir(stock_dir)

    def stock_forget():
        shutil.rmtree(stock_dir)
        os.sync()

    saves = _rounds({"ours": ours_save, "stock": stock_save}, repeats, drop,
                    {"ours": ours_forget, "stock": stock_forget})
    stock_save()
    ours_save()
    return saves, step[0]


def _restore_rounds(same, another, run_layout, step, want, repeats, drop):
    """Checks that every way of restoring gives back the table, then times them."""
    jobs = {"ours same": lambda: same.ours(run_layout, step), "stock same": same.stock,
            "ours other": lambda: another.ours(run_layout, step),
            "stock other": another.stock}
    for name, job in jobs.items():
        job()
        restorer = same if "same" in name else another
        if restorer.table_crc() != want:
            raise RuntimeError(f"restore '{name}' does not give back the trained table")
    return _rounds(jobs, repeats, drop)


def _bytes_on_disk(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))


def _rows(saves, restores, nbytes, shards, parts, other, drop, ours_disk, stock_disk):
    med = {k: statistics.median(v) for k, v in {**saves, **restores}.items()}
    gbps = lambda s: f"{s:.2f}s ({nbytes / 1e9 / s:.2f} GB/s)"  # noqa: E731
    cache = "cold" if drop else "warm cache"
    other_name = f"{other} parts" if other else "unpartitioned"
    table = Table()
    table.add(f"save: ours K={shards} (+manifest, fsync, commit) vs stock "
              "Saver(sharded=True)+fsync", gbps(med["ours"]), gbps(med["stock"]),
              f"{med['stock'] / med['ours']:.2f}x", "", None)
    table.add(f"restore into {parts} parts (same): ours verified read+load vs stock "
              f"Saver.restore, {cache}", gbps(med["ours same"]), gbps(med["stock same"]),
              f"{med['stock same'] / med['ours same']:.2f}x", "", None)
    table.add(f"restore into {other_name} (other): ours vs stock, {cache}",
              gbps(med["ours other"]), gbps(med["stock other"]),
              f"{med['stock other'] / med['ours other']:.2f}x", "", None)
    table.add(f"ours: restore into {other_name} vs into {parts} parts",
              f"{med['ours other']:.2f}s", f"{med['ours same']:.2f}s",
              f"{med['ours other'] / med['ours same']:.2f}x", "", None)
    table.add(f"stock: restore into {other_name} vs into {parts} parts",
              f"{med['stock other']:.2f}s", f"{med['stock same']:.2f}s",
              f"{med['stock other'] / med['stock same']:.2f}x", "", None)
    table.add("  bytes on disk: ours vs stock (info)", f"{ours_disk:,}", f"{stock_disk:,}",
              f"{ours_disk / stock_disk:.4f}x", "", None)
    fmt = lambda xs: ",".join(f"{x:.2f}" for x in xs)  # noqa: E731
    log("raw seconds: " + "; ".join(f"{k} [{fmt(v)}]"
                                    for k, v in {**saves, **restores}.items()))
    return table.rows


def main(argv=None) -> int:
    args = parse_args(argv)
    table = Table()
    table.rows = run(args)
    print()
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
