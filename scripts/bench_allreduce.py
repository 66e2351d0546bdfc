#!/usr/bin/env python
"""Benchmarks the bucketed gradient all-reduce against its baselines, in one run.

Two Ray actors on CPU (``ring`` transport) each build one graph holding, for a
gradient set, three ways to average it across the pair:

* ``bucketed``: ``allreduce_gradients`` (flatten + concat per bucket, one
  ``CollectiveReduceV2`` per bucket, split + reshape back);
* ``raw``: one ``CollectiveReduceV2`` of a single flat tensor of the same total
  bytes (the floor: no packing work at all);
* ``per-var``: one collective per variable (no packing, many launches).

Gradients are read from variables, outputs are fetched as a grouped op (nothing
copied back to Python), and the variants are interleaved over several rounds
so machine noise hits them alike. Prints ms/step (median round) and the ratio
bucketed/raw against the project target.

    python scripts/bench_allreduce.py --iters 300 --big
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import argparse  # noqa: E402
import secrets  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ray  # noqa: E402

T_BUCKETED_VS_RAW = 1.2  # target; never change it to make a run pass
VARIANTS = ("bucketed", "raw", "per-var")
# Digits MLP 64 -> 256 -> 256 -> 10, kernels and biases (~332 KiB).
MLP = [(64, 256), (256,), (256, 256), (256,), (256, 10), (10,)]
# ~8 MiB: two 1024x1024 layers and a head.
BIG = [(1024, 1024), (1024,), (1024, 1024), (1024,), (1024, 10), (10,)]


@ray.remote(num_cpus=0.5)
class _Worker:
    def __init__(self):
        from distributed.train import collective
        self.address = f"{ray.util.get_node_ip_address()}:{collective.pick_free_port()}"

    def get_address(self) -> str:
        return self.address

    def setup(self, addresses, rank, sets, bucket_bytes):
        import numpy as np
        import tensorflow as tf

        from distributed.train import buckets, collective
        spec = collective.GroupSpec(tuple(addresses), rank, timeout_seconds=60.0)
        self.server = collective.start_server(spec)
        graph = tf.Graph()
        self.ops = {}
        key = 1000  # every collective in the process gets its own instance keys
        with graph.as_default():
            for name, shapes in sets.items():
                rng = np.random.default_rng(rank)
                vs = [tf.Variable(rng.normal(size=s).astype(np.float32),
                                  name=f"{name}_g{i}") for i, s in enumerate(shapes)]
                pairs = [(v.read_value(), v) for v in vs]
                total = sum(int(np.prod(s)) for s in shapes)
                flat = tf.Variable(np.ones(total, np.float32), name=f"{name}_flat")
                plan = len(buckets.plan_buckets(
                    [("float32", 4 * int(np.prod(s))) for s in shapes], bucket_bytes))
                bucketed = collective.allreduce_gradients(pairs, spec, bucket_bytes, key)
                per_var = collective.allreduce_gradients(pairs, spec, 1, key + plan)
                with tf.device(spec.task_device):
                    raw = tf.raw_ops.CollectiveReduceV2(
                        input=flat.read_value(), group_size=spec.group_size, group_key=spec.group_key,
                        instance_key=key + plan + len(shapes), ordering_token=[],
                        merge_op="Add", final_op="Div", communication_hint=spec.resolved_hint(),
                        timeout_seconds=0.0)
                key += plan + len(shapes) + 1
                self.ops[name] = {
                    "bucketed": tf.group(*[g for g, _ in bucketed]),
                    "raw": tf.group(raw),
                    "per-var": tf.group(*[g for g, _ in per_var]),
                    "buckets": plan, "bytes": 4 * total}
            init = tf.compat.v1.global_variables_initializer()
        self.sess = tf.compat.v1.Session(self.server.target, graph=graph,
                                         config=collective.session_config(spec))
        self.sess.run(init)
        self.options = collective.run_options(spec)
        return {n: (o["buckets"], o["bytes"]) for n, o in self.ops.items()}

    def run(self, name: str, variant: str, iters: int) -> float:
        op = self.ops[name][variant]
        start = time.perf_counter()
        for _ in range(iters):
            self.sess.run(op, options=self.options)
        return (time.perf_counter() - start) / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300, help="steps per round (MLP)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--bucket-mib", type=float, default=8.0)
    parser.add_argument("--big", action="store_true", help="also the ~8 MiB set")
    args = parser.parse_args()

    sets = {"mlp": MLP, **({"big": BIG} if args.big else {})}
    # A throwaway token: a new local cluster otherwise writes ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}})
    try:
        workers = [_Worker.remote() for _ in range(2)]
        addresses = ray.get([w.get_address.remote() for w in workers])
        info = ray.get([w.setup.remote(addresses, r, sets, int(args.bucket_mib * 2**20))
                        for r, w in enumerate(workers)])[0]
        failed = False
        for name in sets:
            buckets, nbytes = info[name]
            iters = args.iters if name == "mlp" else max(10, args.iters // 10)
            times = {v: [] for v in VARIANTS}
            for variant in VARIANTS:
                ray.get([w.run.remote(name, variant, args.warmup) for w in workers])
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    per_rank = ray.get([w.run.remote(name, variant, iters) for w in workers])
                    times[variant].append(max(per_rank))
            ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
            ratio = ms["bucketed"] / ms["raw"]
            ok = ratio <= T_BUCKETED_VS_RAW
            failed |= not ok
            print(f"{name}: {nbytes / 2**20:.2f} MiB in {len(sets[name])} gradients, "
                  f"{buckets} bucket(s); {args.rounds} rounds x {iters} steps")
            for variant in VARIANTS:
                print(f"  {variant:9s} {ms[variant]:8.3f} ms/step")
            print(f"  bucketed/raw {ratio:.2f}x (target <= {T_BUCKETED_VS_RAW}x) "
                  f"{'PASS' if ok else 'FAIL'}; per-var/bucketed "
                  f"{ms['per-var'] / ms['bucketed']:.2f}x")
        return 1 if failed else 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
