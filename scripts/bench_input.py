#!/usr/bin/env python
"""Benchmarks the kinds of input on an input-heavy workload, side by side in one run.

The workload (``distributed.examples.images``): 32x32x3 uint8 image records
(the bundled digits upscaled, tinted, shifted and noised per record,
``--copies`` x 1500 of them), written once to TFRecord files and to Parquet
files in a scratch directory; every input decodes them, pads 4 and randomly
crops 32x32, flips left-right at random and scales to float32; the same small
CNN (``small_cnn_model_fn``, ``--filters``) trains on 2 CPU workers, batch
``--batch-size`` per worker, momentum SGD, checkpoints off but the last step
(``serving_every: 0``, ``full_every: 0``).
The variants:

  a. generator + feed_dict as before: a Python generator reading the TFRecord
     files (``tf_record_iterator``, ``Example.FromString``, numpy decode, crop
     and flip), ``input_prefetch: 0`` (read on the training thread);
  b. the same generator, ``input_prefetch: 2`` (the default background queue);
  c. tf.data in the graph: ``TFRecordDataset(files).shard(n, i).map(parse,
     decode, crop, flip, num_parallel_calls=AUTOTUNE).repeat().batch(B)``;
  d. Ray Data: ``input: {ray_dataset: distributed.examples.images:image_ray_dataset,
     label: label}``: ``read_parquet(path).materialize()`` (the raw bytes,
     37 MB) then ``map_batches`` (numpy decode, crop, flip), which runs again
     every epoch (``--raydata-reread``: no materialize, every epoch lists and
     reads the files again in Ray tasks);
  e. (only with ``--variants``, no target) tf.data vectorized: ``batch`` first,
     then one ``map`` per batch (``parse_example``, ``gather`` crops).

Every variant uses ``cpus_per_worker: 0.25`` (coordinator 0.25): on a 2-CPU
local Ray that leaves 1.25 CPUs for Ray Data's map tasks, which a dataset not
materialized at the end needs (the trainer refuses it with less than 1 free);
the workers' TF threads are the same as with 0.5 (intra-op ceil(0.25) = 1).
The map is not materialized because it draws the random crops and flips:
materializing after it would freeze them for every epoch.

Runs go through ``distributed.train.trainer.train(config)`` in this process,
on one local Ray, alternating a, b, c, d, a, b, c, d, ... (``--pairs``
rounds); each figure is the median of its runs. A run's steps/s is rank 0's
over its steady rounds (``--log-every`` steps each): all but the first
``--warmup-rounds`` and the last (which holds the final checkpoint). Ratios
are against (a) measured in the same run. A thin ``Worker`` subclass times,
per step, the wait for the input (``source.feed``: the generator itself in a,
the queue in b and d, nothing in c) and the ``Session.run``, the waits over
50 ms (stalls: Ray Data's epoch starts), and the worker process's CPU time;
the library is unchanged. A probe before the runs times
each input and the model step alone in this process, with the workers'
thread settings.

    python scripts/bench_input.py                      # ~6-9 minutes on 2 cores
    python scripts/bench_input.py --pairs 3 --steps 1000
    python scripts/bench_input.py --variants a,c,e     # + vectorized tf.data
    python scripts/bench_input.py --position           # input-position costs
                                                       # (scripts/_bench_position.py,
                                                       # ~10 minutes on 2 cores)
"""

from __future__ import annotations

import os

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distributed  # noqa: E402,F401  the one TF world, before TensorFlow

import argparse  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _benchlib import print_table  # noqa: E402

# Targets: never change these to make a run pass.
T_QUEUE_VS_FEED = 1.15     # (b) / (a) steps/s, at least
T_TFDATA_VS_FEED = 1.3     # (c) / (a) steps/s, at least
T_RAYDATA_VS_TFDATA = 0.8  # (d) / (c) steps/s, at least

IMAGES = "distributed.examples.images"
VARIANTS = {
    "a": "generator, feed on the training thread (input_prefetch 0)",
    "b": "generator, background queue (input_prefetch 2)",
    "c": "tf.data in the graph (TFRecordDataset ... map AUTOTUNE)",
    "d": "Ray Data (read_parquet + map_batches, dealt in chunks)",
    "e": "tf.data vectorized (batch, then map per batch)",
}
CPUS_PER_WORKER = 0.25
WORKERS = 2
STALL_S = 0.05  # an input wait longer than this counts as a stall


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--pairs", type=int, default=2,
                   help="rounds of (a, b, c, d), alternating; figures are medians "
                        "(default 2)")
    p.add_argument("--steps", type=int, default=600, help="steps per run (default 600)")
    p.add_argument("--log-every", type=int, default=100,
                   help="steps per round report (default 100)")
    p.add_argument("--warmup-rounds", type=int, default=1,
                   help="leading rounds left out of the timed window (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="per worker (default 64)")
    p.add_argument("--copies", type=int, default=8,
                   help="copies of the 1500 train digits written as records (default 8)")
    p.add_argument("--files", type=int, default=4,
                   help="TFRecord files and Parquet files (default 4 each)")
    p.add_argument("--filters", default="8,16",
                   help="the CNN's conv widths (default 8,16)")
    p.add_argument("--variants", default="a,b,c,d",
                   help="variants to run, in this order each round (default a,b,c,d; "
                        "a is the baseline; e: tf.data vectorized, for comparison)")
    p.add_argument("--raydata-reread", action="store_true",
                   help="(d): do not materialize the Parquet read (every epoch lists "
                        "and reads the files again in Ray tasks)")
    p.add_argument("--probe-batches", type=int, default=150,
                   help="batches per input in the probe; 0 skips it (default 150)")
    p.add_argument("--verbose", action="store_true", help="print the trainer's lines")
    p.add_argument("--position", action="store_true",
                   help="instead: steps/s with input_position exact vs restart; "
                        "full-checkpoint save time/bytes with a 10,000-element shuffle "
                        "buffer vs none, and the position's bytes taken apart; the "
                        "resume of a replayed vs a resumable (start_batch) generator "
                        "(scripts/_bench_position.py)")
    p.add_argument("--position-full-every", type=int, default=50,
                   help="--position: steps between full checkpoints (default 50)")
    p.add_argument("--position-resume-at", default="1000,5000",
                   help="--position: batches per worker consumed before the resumes "
                        "timed (default 1000,5000)")
    p.add_argument("--dir", default="/tmp", help="parent of the scratch directory")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or not set(args.variants) <= set(VARIANTS) or \
            args.variants[0] != "a" or len(set(args.variants)) != len(args.variants):
        p.error("--variants: expected distinct letters of a,b,c,d,e starting with a")
    try:
        args.filters = [int(f) for f in args.filters.split(",") if f.strip()]
    except ValueError:
        p.error("--filters: expected comma-separated integers")
    if args.pairs < 1:
        p.error("--pairs: expected >= 1")
    rounds = args.steps // args.log_every
    if args.steps % args.log_every or rounds < args.warmup_rounds + 2:
        p.error(f"--steps must be a multiple of --log-every giving at least "
                f"--warmup-rounds + 2 = {args.warmup_rounds + 2} rounds")
    return args


# -- data --------------------------------------------------------------------

def write_data(args, scratch):
    from distributed.examples import images
    t = time.perf_counter()
    x, y = images.make_records(args.copies, seed=0)
    tfr = os.path.join(scratch, "tfrecord")
    pq = os.path.join(scratch, "parquet")
    images.write_tfrecords(tfr, x, y, args.files)
    images.write_parquet(pq, x, y, args.files)
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))  # noqa: E731
    log(f"wrote {len(y)} records ({x.shape[1]}x{x.shape[2]}x{x.shape[3]} uint8) to "
        f"{args.files} TFRecord files ({size(tfr) / 1e6:.1f} MB) and {args.files} "
        f"Parquet files ({size(pq) / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s")
    return {"tfrecord": tfr, "parquet": pq, "records": len(y)}


# -- probe: each input and the model step alone, in this process --------------

def _session_config():
    import tensorflow as tf
    # What a worker uses for cpus_per_worker 0.25 (distributed/train/worker.py).
    return tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=max(1, int(CPUS_PER_WORKER + 0.999)),
        inter_op_parallelism_threads=2)


def probe(args, data):
    """ms per batch (wall, CPU) of the generator, the tf.data pipeline and one
    model step fed a ready batch, each alone (worker 0's shard)."""
    import numpy as np
    import tensorflow as tf

    from distributed.examples import images
    from distributed.model import TRAIN
    n = args.probe_batches
    params = {"path": data["tfrecord"]}
    out = {}

    gen = images.image_generator_input_fn(0, WORKERS, args.batch_size, params)
    for _ in range(5):
        feats, labels = next(gen)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(gen)
    out["generator"] = ((time.perf_counter() - t) / n, (time.process_time() - c) / n)

    for name, input_fn in (("tf.data", images.image_dataset_input_fn),
                           ("tf.data vectorized", images.image_dataset_vectorized_input_fn)):
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.set_random_seed(0)
            ds = input_fn(0, WORKERS, args.batch_size, params)
            nxt = tf.compat.v1.data.make_one_shot_iterator(
                ds.prefetch(tf.data.AUTOTUNE)).get_next()
        with tf.compat.v1.Session(graph=graph, config=_session_config()) as sess:
            for _ in range(10):
                sess.run(nxt)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(n):
                sess.run(nxt)
            out[name] = ((time.perf_counter() - t) / n, (time.process_time() - c) / n)

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)
        x = tf.compat.v1.placeholder(tf.float32, (None,) + feats["image"].shape[1:])
        y = tf.compat.v1.placeholder(tf.int64, (None,))
        spec = images.small_cnn_model_fn({"image": x}, y, TRAIN, {"filters": args.filters})
        train_op = tf.compat.v1.train.MomentumOptimizer(0.05, 0.9).minimize(spec.loss)
        init = tf.compat.v1.global_variables_initializer()
    with tf.compat.v1.Session(graph=graph, config=_session_config()) as sess:
        sess.run(init)
        feed = {x: np.asarray(feats["image"]), y: labels}
        for _ in range(10):
            sess.run([train_op, spec.loss], feed)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            sess.run([train_op, spec.loss], feed)
        out["model step"] = ((time.perf_counter() - t) / n, (time.process_time() - c) / n)
    return out


# -- training runs -------------------------------------------------------------

def _timed_worker_class():
    """A Worker that sums, per round, the time in ``source.feed`` (waiting for
    the input), in ``Session.run``, and the process's CPU time."""
    from distributed.train.worker import Worker

    class TimedWorker(Worker):
        def setup(self, *a, **k):
            out = super().setup(*a, **k)
            self._bench = {"feed": 0.0, "run": 0.0, "stall": 0.0, "stalls": 0}
            real_feed, bench = self.source.feed, self._bench

            def feed(step):
                t = time.perf_counter()
                try:
                    return real_feed(step)
                finally:
                    dt = time.perf_counter() - t
                    bench["feed"] += dt
                    if dt > STALL_S:
                        bench["stall"] += dt
                        bench["stalls"] += 1

            self.source.feed = feed
            real = self.sess

            class _TimedSession:
                def run(self, *ra, **rk):
                    t = time.perf_counter()
                    try:
                        return real.run(*ra, **rk)
                    finally:
                        bench["run"] += time.perf_counter() - t

                def __getattr__(self, name):
                    return getattr(real, name)

            self._bench_real, self._bench_timed = real, _TimedSession()
            return out

        def train(self, until_step):
            before = dict(self._bench)
            cpu = time.process_time()
            self.sess = self._bench_timed
            try:
                report = super().train(until_step)
            finally:
                self.sess = self._bench_real
            report.extra["bench_cpu"] = time.process_time() - cpu
            for key in ("feed", "run", "stall", "stalls"):
                report.extra[f"bench_{key}"] = self._bench[key] - before[key]
            return report

    return TimedWorker


def make_config(args, data, scratch, variant, run):
    from distributed import config as config_lib
    cfg = {
        "model": f"{IMAGES}:small_cnn_model_fn",
        "model_params": {"filters": args.filters},
        "optimizer": {"name": "momentum", "learning_rate": 0.05, "momentum": 0.9},
        "batch_size": args.batch_size, "steps": args.steps, "log_every": args.log_every,
        "workers": WORKERS, "cpus_per_worker": CPUS_PER_WORKER,
        "storage": os.path.join(scratch, "runs"), "run": run,
        "selection": {"policy": "trainable"},
        "checkpoint": {"serving_every": 0, "full_every": 0},
    }
    if variant in ("a", "b"):
        cfg.update(input=f"{IMAGES}:image_generator_input_fn",
                   input_params={"path": data["tfrecord"]},
                   input_prefetch=0 if variant == "a" else 2)
    elif variant in ("c", "e"):
        fn = "image_dataset_input_fn" if variant == "c" else \
            "image_dataset_vectorized_input_fn"
        cfg.update(input=f"{IMAGES}:{fn}", input_params={"path": data["tfrecord"]})
    else:
        cfg.update(input={"ray_dataset": f"{IMAGES}:image_ray_dataset", "label": "label"},
                   input_params={"path": data["parquet"],
                                 "cache": not args.raydata_reread})
    return config_lib.from_dict(cfg)


def train_one(args, config):
    """One ``trainer.train`` run; returns its steady-state figures."""
    import distributed.train.worker as worker_mod
    from distributed.train import trainer
    lines = []

    def echo(line):
        lines.append(line)
        if args.verbose:
            print("    " + line.replace("\n", "\n    "), flush=True)

    orig = worker_mod.Worker
    worker_mod.Worker = _timed_worker_class()
    try:
        summary = trainer.train(config, echo=echo)
    finally:
        worker_mod.Worker = orig
    rounds = summary["rounds"]
    steady = rounds[args.warmup_rounds:-1]
    prev = {id(r): (rounds[i - 1].step if i else 0) for i, r in enumerate(rounds)}
    steps = sum(r.step - prev[id(r)] for r in steady)
    secs = sum((r.step - prev[id(r)]) / r.steps_per_sec for r in steady)
    per_step = lambda key: 1e3 * sum(r.extra[key] for r in steady) / steps  # noqa: E731
    return {"sps": steps / secs, "steps": steps, "step_ms": 1e3 * secs / steps,
            "feed_ms": per_step("bench_feed"), "run_ms": per_step("bench_run"),
            "cpu_ms": per_step("bench_cpu"), "stall_ms": per_step("bench_stall"),
            "stalls": sum(r.extra["bench_stalls"] for r in steady),
            "rounds": [round(r.steps_per_sec, 1) for r in rounds],
            "first_step": summary["first_step_seconds"], "seconds": summary["seconds"],
            "loss": rounds[-1].loss}


def run_all(args, data, scratch):
    import ray

    from distributed.train.cluster import actor_env_vars
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(actor_env_vars(), PYTHONPATH=ROOT)})
    log(f"local Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs; each run: "
        f"{WORKERS} workers x {CPUS_PER_WORKER} CPU + coordinator 0.25")
    runs = {v: [] for v in args.variants}
    try:
        for pair in range(args.pairs):
            for v in args.variants:
                cfg = make_config(args, data, scratch, v, f"bench-input-{v}-{pair}")
                log(f"({v}) round {pair + 1}/{args.pairs}: {VARIANTS[v]}, "
                    f"{args.steps} steps ...")
                r = train_one(args, cfg)
                runs[v].append(r)
                log(f"    {r['sps']:.1f} steps/s over {r['steps']} steps (rounds "
                    f"{r['rounds']}); per step: input wait {r['feed_ms']:.2f} ms, "
                    f"Session.run {r['run_ms']:.2f} ms, worker CPU {r['cpu_ms']:.2f} ms, "
                    f"{r['stalls']} input stalls > {1e3 * STALL_S:.0f} ms "
                    f"({r['stall_ms']:.2f} ms/step); "
                    f"first step {r['first_step']:.1f}s, run {r['seconds']:.0f}s")
                shutil.rmtree(cfg.storage_path, ignore_errors=True)
    finally:
        ray.shutdown()
    return runs


# -- main ------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    # A throwaway token: a new local cluster otherwise writes ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    if args.position:
        import _bench_position
        _bench_position.run(args, log)
        return 0
    scratch = tempfile.mkdtemp(prefix="bench_input-", dir=args.dir)
    try:
        data = write_data(args, scratch)
        probed = probe(args, data) if args.probe_batches > 0 else {}
        for name, (wall, cpu) in probed.items():
            log(f"probe: {name:18} {1e3 * wall:6.2f} ms/batch wall, {1e3 * cpu:6.2f} ms "
                "CPU (process)")
        runs = run_all(args, data, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    med = {v: {k: statistics.median(r[k] for r in rs)
               for k in ("sps", "step_ms", "feed_ms", "run_ms", "cpu_ms")}
           for v, rs in runs.items()}
    base = med["a"]["sps"]
    targets = {"b": ("a", T_QUEUE_VS_FEED), "c": ("a", T_TFDATA_VS_FEED),
               "d": ("c", T_RAYDATA_VS_TFDATA)}
    rows = []
    for v in args.variants:
        ratio = med[v]["sps"] / base
        against, target = targets.get(v, (None, None))
        if against is not None and against in med:
            r = med[v]["sps"] / med[against]["sps"]
            check = (f"{r:.2f}x {against} >= {target}x", "PASS" if r >= target else "MISS")
        else:
            check = ("", "")
        rows.append((f"({v}) {VARIANTS[v]}", f"{med[v]['sps']:.1f}", f"{ratio:.2f}x",
                     *check, f"{med[v]['step_ms']:.2f}", f"{med[v]['feed_ms']:.2f}",
                     f"{med[v]['run_ms']:.2f}", f"{med[v]['cpu_ms']:.2f}"))
    heads = ("variant", "steps/s", "vs (a)", "target", "result", "ms/step",
             "input wait", "Session.run", "worker CPU")
    print()
    print_table(heads, rows)
    print()
    print(f"medians of {args.pairs} alternating round(s) ({', '.join(args.variants)}); "
          f"{args.steps} steps per run, timed rounds {args.warmup_rounds + 1}.."
          f"{args.steps // args.log_every - 1} of {args.log_every} steps (rank 0); "
          f"{WORKERS} workers x batch {args.batch_size}, {data['records']} records, "
          f"CNN filters {args.filters}, cpus_per_worker {CPUS_PER_WORKER}")
    print("per-step columns (ms, medians, rank 0): input wait = source.feed (the "
          "generator itself in a; the queue in b, d; none in c), Session.run = the "
          "step incl. all-reduce (and the tf.data get_next in c), worker CPU = the "
          "worker process's CPU time")
    for v in args.variants:
        print(f"({v}) steps/s per run {[round(r['sps'], 1) for r in runs[v]]}; rounds "
              f"{[r['rounds'] for r in runs[v]]}; input stalls > {1e3 * STALL_S:.0f} ms "
              f"per run {[r['stalls'] for r in runs[v]]} "
              f"({[round(r['stall_ms'], 2) for r in runs[v]]} ms/step); first step "
              f"after {[round(r['first_step'], 1) for r in runs[v]]}s; last loss "
              f"{[round(r['loss'], 3) for r in runs[v]]}")
    if probed:
        print("probe (this process, alone, worker 0's shard, intra-op 1 / inter-op 2): "
              + "; ".join(f"{name} {1e3 * w:.2f} ms/batch wall, {1e3 * c:.2f} ms CPU"
                          for name, (w, c) in probed.items()))
    try:
        print(f"load average (1/5/15 min) at the end: "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    except OSError:
        pass
    missed = sum(r[4] == "MISS" for r in rows)
    print(f"total {time.perf_counter() - t_start:.0f}s; "
          + (f"{missed} target(s) MISSED" if missed else "all targets PASS"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
