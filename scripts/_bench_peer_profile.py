#!/usr/bin/env python
"""Where one of our training steps goes (issue 12): the digits MLP step of
``distributed/train/worker.py`` (``Session.run`` on the in-process TF server's
target, ``feed_dict`` of a numpy batch, gradients all-reduced by
``CollectiveReduceV2`` over gRPC), timed against variants that each take one
cost away. No Ray: two plain processes, each one worker (same graph builder,
server, session config, thread pools and run options as ``Worker.setup``).

    python scripts/_bench_peer_profile.py [--steps 500] [--rounds 3] [--k 10,50]

Variants (ms per training step, medians over ``--rounds`` rounds, every round
runs every variant in the same order on both processes):

* ``ours``: the worker's loop as it is: next batch from the input function,
  feed dict, ``sess.run([train_op, loss], feed, options=run_options)``,
  ``np.isfinite``, ``float(loss)``.
* ``prefetched``: the same with the batches made beforehand (no input Python).
* ``no-options``: prefetched, without ``RunOptions(timeout_in_ms)``.
* ``callable``: prefetched, ``Session.make_callable`` (no per-run fetch/feed
  bookkeeping in Python).
* ``no-feed``: the batch is in a variable (no feed at all), else as ``ours``.
* ``no-collective``: prefetched, the same graph without the all-reduce, same
  gRPC-target Session (compute + session overhead only).
* ``direct-no-collective``: as above on a local (Direct)Session.
* ``loop-kK``: K steps per ``Session.run``: one feed of K stacked batches and a
  ``tf.while_loop`` whose body is the whole step, all-reduce included.
* ``loop-kK-callable``: the same through ``make_callable``.
* ``gather``: prefetched, the all-reduce done as one ``CollectiveGatherV2`` of
  the concatenated gradients and a local mean (with 2 workers a ring gather is
  one exchange, a ring all-reduce two: reduce-scatter then all-gather).
* ``loop-kK-gather-callable``: both changes.
* ``allreduce-only``: one ``CollectiveReduceV2`` of the gradients' bytes per
  run; ``allreduce-4B``: of one float (the fixed launch cost);
  ``allgather-only``, ``allgather-4B``: the same with ``CollectiveGatherV2``.
* ``empty-run``: ``Session.run`` of a no-op on the gRPC target;
  ``empty-run-direct``: on a DirectSession; ``feed-only``: the batch fed to a
  trivial op on the gRPC target.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MLP = {
    "model": "distributed.examples.digits:mlp_model_fn",
    "model_params": {"hidden": [256, 256]},
    "input": "distributed.examples.digits:digits_input_fn",
    "input_params": {"seed": 0},
    "optimizer": {"name": "momentum", "learning_rate": 0.05, "momentum": 0.9},
    "batch_size": 64,
    "workers": 2,
    "cpus_per_worker": 0.5,
    "steps": 1000,
    "storage": "/tmp/unused",
    "run": "profile",
}


def worker_main(args) -> int:
    import functools
    import itertools

    import numpy as np
    import tensorflow as tf

    from distributed.config import from_dict
    from distributed.model import TRAIN, load_function
    from distributed.train import collective
    from distributed.inputs.spec import InputSpec
    from distributed.model.graphs import call_model_fn
    from distributed.train.graph import build_train_graph, make_optimizer

    cfg = from_dict(MLP)
    rank = args.rank
    addresses = args.addresses.split(",")
    ks = [int(x) for x in args.k.split(",")]
    input_fn = load_function(cfg.input, "input", 4)
    batches = iter(input_fn(rank, cfg.workers, cfg.batch_size, dict(cfg.input_params)))
    first = next(batches)
    batches = itertools.chain([first], batches)
    input_spec = InputSpec.from_batch(*first, "input")
    gs = collective.GroupSpec(addresses=tuple(addresses), rank=rank,
                              timeout_seconds=cfg.collective_timeout)
    base = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=max(1, int(cfg.cpus_per_worker + 0.999)),
        inter_op_parallelism_threads=2)
    server = collective.start_server(gs, base)
    sconf = collective.session_config(gs, base)
    opts = collective.run_options(gs)

    def grpc_session(graph):
        return tf.compat.v1.Session(server.target, graph=graph, config=sconf)

    def reduce_at(key):
        return functools.partial(collective.allreduce_gradients, spec=gs,
                                 bucket_bytes=int(cfg.bucket_mib * 2**20),
                                 instance_key_start=key)

    def gather_at(key):
        """All-reduce as one gather of every gradient (concatenated) + local mean."""
        def reduce(pairs):
            pairs = list(pairs)
            shapes = [g.shape for g, _ in pairs]
            with tf.name_scope("allgather"), tf.device(gs.task_device):
                flat = tf.concat([tf.reshape(g, [-1]) for g, _ in pairs], 0)
                got = tf.raw_ops.CollectiveGatherV2(
                    input=flat, group_size=gs.group_size, group_key=gs.group_key,
                    instance_key=key, ordering_token=[], communication_hint="ring",
                    timeout_seconds=0.0)
                mean = tf.reduce_mean(tf.reshape(got, [gs.group_size, -1]), axis=0)
                parts = tf.split(mean, [s.num_elements() for s in shapes])
            return [(tf.reshape(t, sh), v) for t, sh, (_, v) in zip(parts, shapes, pairs)]
        return reduce

    # ours: the worker's graph and session.
    tg = build_train_graph(cfg, input_spec, reduce_fn=reduce_at(1000))
    s_ours = grpc_session(tg.graph)
    s_ours.run(tg.init_op)
    # the same graph without the all-reduce, gRPC target and DirectSession.
    tg_nc = build_train_graph(cfg, input_spec, reduce_fn=None)
    s_nc = grpc_session(tg_nc.graph)
    s_nc.run(tg_nc.init_op)
    tg_dnc = build_train_graph(cfg, input_spec, reduce_fn=None)
    s_dnc = tf.compat.v1.Session(graph=tg_dnc.graph, config=base)
    s_dnc.run(tg_dnc.init_op)

    # no feed: the batch lives in variables.
    g_var = tf.Graph()
    with g_var.as_default(), tf.device(gs.task_device):
        tf.compat.v1.set_random_seed(cfg.seed)
        xv = tf.Variable(first[0]["image"], name="x_batch", trainable=False)
        yv = tf.Variable(first[1], name="y_batch", trainable=False)
        spec = call_model_fn(cfg, {"image": xv.read_value()}, yv.read_value(), TRAIN)
        opt = make_optimizer(cfg.optimizer)
        gv = [(g, v) for g, v in opt.compute_gradients(spec.loss) if g is not None]
        var_train = opt.apply_gradients(reduce_at(2000)(gv))
        var_loss = spec.loss
        var_init = tf.compat.v1.global_variables_initializer()
    s_var = grpc_session(g_var)
    s_var.run(var_init)

    # K steps per run: a while_loop over K fed batches, all-reduce inside.
    def build_loop(reduce_fn, k):
        g = tf.Graph()
        with g.as_default(), tf.device(gs.task_device):
            tf.compat.v1.set_random_seed(cfg.seed)
            xs = tf.compat.v1.placeholder(tf.float32, (k, None, 64), name="xs")
            ys = tf.compat.v1.placeholder(tf.int64, (k, None), name="ys")
            call_model_fn(cfg, {"image": xs[0]}, ys[0], TRAIN)  # makes the variables
            var_list = list(tf.compat.v1.trainable_variables())
            opt = make_optimizer(cfg.optimizer)
            opt.apply_gradients([(tf.zeros_like(v), v) for v in var_list])  # the slots

            def body(i, losses):
                spec = call_model_fn(cfg, {"image": xs[i]}, ys[i], TRAIN)
                gv = [(g_, v) for g_, v in
                      opt.compute_gradients(spec.loss, var_list=var_list)
                      if g_ is not None]
                apply = opt.apply_gradients(reduce_fn(gv))
                with tf.control_dependencies([apply]):
                    return i + 1, losses.write(i, spec.loss)

            _, losses = tf.compat.v1.while_loop(
                lambda i, _: i < k, body,
                [tf.constant(0), tf.TensorArray(tf.float32, size=k)])
            losses = losses.stack()
            init = tf.compat.v1.global_variables_initializer()
        sess = grpc_session(g)
        sess.run(init)
        return sess, xs, ys, losses

    loops = {}  # (k, gather?) -> (session, xs, ys, losses)
    for i, k in enumerate(ks):
        loops[k, False] = build_loop(reduce_at(3000 + 10 * i), k)
        loops[k, True] = build_loop(gather_at(3500 + 10 * i), k)

    # ours with the gather all-reduce.
    tg_g = build_train_graph(cfg, input_spec, reduce_fn=gather_at(2500))
    s_g = grpc_session(tg_g.graph)
    s_g.run(tg_g.init_op)

    # collective only, empty runs, feed only.
    g_misc = tf.Graph()
    with g_misc.as_default(), tf.device(gs.task_device):
        nbytes = sum(int(np.prod(v.shape)) for v in tg.variables
                     if v.trainable) * 4
        buf = tf.Variable(tf.zeros([nbytes // 4]), trainable=False)
        tiny = tf.Variable(tf.zeros([1]), trainable=False)
        coll = [tf.raw_ops.CollectiveReduceV2(
            input=t.read_value(), group_size=gs.group_size, group_key=gs.group_key,
            instance_key=key, ordering_token=[], merge_op="Add", final_op="Div",
            communication_hint="ring", timeout_seconds=0.0).op
            for t, key in ((buf, 4000), (tiny, 4001))]
        gath = [tf.raw_ops.CollectiveGatherV2(
            input=t.read_value(), group_size=gs.group_size, group_key=gs.group_key,
            instance_key=key, ordering_token=[], communication_hint="ring",
            timeout_seconds=0.0).op
            for t, key in ((buf, 4002), (tiny, 4003))]
        noop = tf.no_op()
        fx = tf.compat.v1.placeholder(tf.float32, (None, 64))
        fy = tf.compat.v1.placeholder(tf.int64, (None,))
        fed = tf.group(tf.identity(fx), tf.identity(fy))
        misc_init = tf.compat.v1.global_variables_initializer()
    s_misc = grpc_session(g_misc)
    s_misc.run(misc_init)
    g_dnoop = tf.Graph()
    with g_dnoop.as_default():
        dnoop = tf.no_op()
    s_dnoop = tf.compat.v1.Session(graph=g_dnoop, config=base)

    pre = [next(batches) for _ in range(max(ks) * 20)]

    def barrier():
        for _ in range(3):
            s_misc.run(coll[1], options=opts)

    def loop_worker(n):  # Worker.train's loop, as it is
        losses = []
        for _ in range(n):
            features, labels = next(batches)
            feed = {tg.features[k_]: v for k_, v in features.items()}
            feed[tg.labels] = labels
            _, loss = s_ours.run([tg.train_op, tg.loss], feed, options=opts)
            if not np.isfinite(loss):
                raise RuntimeError("diverged")
            losses.append(float(loss))

    def loop_fed(sess, g, n, options=True):
        losses = []
        for i in range(n):
            features, labels = pre[i % len(pre)]
            feed = {g.features["image"]: features["image"], g.labels: labels}
            if options:
                _, loss = sess.run([g.train_op, g.loss], feed, options=opts)
            else:
                _, loss = sess.run([g.train_op, g.loss], feed)
            if not np.isfinite(loss):
                raise RuntimeError("diverged")
            losses.append(float(loss))

    ours_callable = s_ours.make_callable([tg.train_op, tg.loss],
                                         [tg.features["image"], tg.labels],
                                         accept_options=True)

    def loop_callable(n):
        losses = []
        for i in range(n):
            features, labels = pre[i % len(pre)]
            _, loss = ours_callable(features["image"], labels, options=opts)
            if not np.isfinite(loss):
                raise RuntimeError("diverged")
            losses.append(float(loss))

    def loop_var(n):
        losses = []
        for _ in range(n):
            _, loss = s_var.run([var_train, var_loss], options=opts)
            if not np.isfinite(loss):
                raise RuntimeError("diverged")
            losses.append(float(loss))

    stacked = {k: [(np.stack([b[0]["image"] for b in pre[j * k:(j + 1) * k]]),
                    np.stack([b[1] for b in pre[j * k:(j + 1) * k]]))
                   for j in range(len(pre) // k)] for k in ks}
    calls = {key: sess.make_callable(losses, [xs, ys], accept_options=True)
             for key, (sess, xs, ys, losses) in loops.items()}

    def loop_k(n, k, use_callable=False, gather=False):  # n steps, n/k runs
        sess, xs, ys, loop_losses = loops[k, gather]
        call = calls[k, gather]
        losses = []
        for j in range(n // k):
            x, y = stacked[k][j % len(stacked[k])]
            if use_callable:
                ls = call(x, y, options=opts)
            else:
                ls = sess.run(loop_losses, {xs: x, ys: y}, options=opts)
            if not np.all(np.isfinite(ls)):
                raise RuntimeError("diverged")
            losses.extend(float(v) for v in ls)

    def repeat(fn):
        def run(n):
            for _ in range(n):
                fn()
        return run

    f0, l0 = pre[0]
    variants = {
        "ours": loop_worker,
        "prefetched": lambda n: loop_fed(s_ours, tg, n),
        "no-options": lambda n: loop_fed(s_ours, tg, n, options=False),
        "callable": loop_callable,
        "no-feed": loop_var,
        "no-collective": lambda n: loop_fed(s_nc, tg_nc, n),
        "direct-no-collective": lambda n: loop_fed(s_dnc, tg_dnc, n),
        "gather": lambda n: loop_fed(s_g, tg_g, n),
        "allreduce-only": repeat(lambda: s_misc.run(coll[0], options=opts)),
        "allreduce-4B": repeat(lambda: s_misc.run(coll[1], options=opts)),
        "allgather-only": repeat(lambda: s_misc.run(gath[0], options=opts)),
        "allgather-4B": repeat(lambda: s_misc.run(gath[1], options=opts)),
        "empty-run": repeat(lambda: s_misc.run(noop, options=opts)),
        "empty-run-direct": repeat(lambda: s_dnoop.run(dnoop)),
        "feed-only": repeat(lambda: s_misc.run(fed, {fx: f0["image"], fy: l0},
                                               options=opts)),
    }
    for k in ks:
        variants[f"loop-k{k}"] = lambda n, k=k: loop_k(n, k)
        variants[f"loop-k{k}-callable"] = lambda n, k=k: loop_k(n, k, True)
        variants[f"loop-k{k}-gather-callable"] = lambda n, k=k: loop_k(n, k, True, True)
    if args.variants:
        keep = args.variants.split(",")
        variants = {name: fn for name, fn in variants.items() if name in keep}
    lcm = math.lcm(*ks)
    n, warm = args.steps, max(lcm, args.steps // 10)
    n -= n % lcm
    warm -= warm % lcm
    times = {name: [] for name in variants}
    for rnd in range(args.rounds):
        for name, fn in variants.items():
            barrier()
            fn(warm)
            barrier()
            t = time.perf_counter()
            fn(n)
            times[name].append((time.perf_counter() - t) / n)
    # Replicas must stay identical (the all-reduce inside the loops pairs up).
    sums = {"ours": s_ours, "gather": s_g, "no-feed": s_var,
            **{f"loop-k{k}{'-gather' if g_ else ''}": loops[k, g_][0] for k, g_ in loops}}
    arrays = {}
    for name, sess in sums.items():
        with sess.graph.as_default():
            vs = tf.compat.v1.trainable_variables()
        for v, value in zip(vs, sess.run(vs)):
            arrays[f"{name}|{v.op.name}"] = value
    np.savez(args.out + ".npz", **arrays)
    checks = {}
    out = {"rank": rank, "steps": n, "rounds": args.rounds, "k": ks, "checks": checks,
           "allreduce_bytes": nbytes, "ms": {name: [1e3 * t for t in ts]
                                             for name, ts in times.items()}}
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", default="10,50",
                   help="steps per run of the loop variants, comma-separated (default 10,50)")
    p.add_argument("--variants", default="",
                   help="comma-separated variants to run (default: all)")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--addresses", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:
        return worker_main(args)

    from distributed.train.collective import pick_free_port
    addresses = ",".join(f"localhost:{pick_free_port()}" for _ in range(2))
    d = tempfile.mkdtemp(prefix="bench_peer_profile-")
    outs = [os.path.join(d, f"rank{r}.json") for r in range(2)]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    t0 = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--rank", str(r), "--addresses",
         addresses, "--out", outs[r], "--steps", str(args.steps), "--rounds",
         str(args.rounds), "--k", args.k, "--variants", args.variants], cwd=ROOT, env=env)
        for r in range(2)]
    rcs = [pr.wait(timeout=900) for pr in procs]
    if any(rcs):
        print(f"workers exited {rcs}", file=sys.stderr)
        return 1
    res = [json.load(open(o)) for o in outs]
    ms = {name: statistics.median(res[0]["ms"][name]) for name in res[0]["ms"]}
    ms1 = {name: statistics.median(res[1]["ms"][name]) for name in res[1]["ms"]}
    print(f"ms per step (medians of {args.rounds} rounds x {res[0]['steps']} steps; "
          f"all-reduce of {res[0]['allreduce_bytes']} bytes), rank 0 / rank 1; "
          f"{time.perf_counter() - t0:.0f}s")
    base = ms["ours"]
    for name, v in ms.items():
        rounds = ", ".join(f"{x:.3f}" for x in res[0]["ms"][name])
        print(f"  {name:<22} {v:7.3f} / {ms1[name]:7.3f} ms  {1e3 / v:7.1f}/s  "
              f"x{base / v:5.2f} vs ours   [{rounds}]")
    import numpy as np
    a0, a1 = (np.load(o + ".npz") for o in outs)
    diff = {}
    for key in a0.files:
        name = key.split("|")[0]
        diff[name] = max(diff.get(name, 0.0), float(np.max(np.abs(a0[key] - a1[key]))))
    # Sessions on one TF server share resource variables by name, so every
    # gRPC-target graph here trains the same weights: the check covers all the
    # variants that ran together, and a no-collective one on the gRPC target
    # (no-collective) makes the replicas differ on purpose.
    print("replicas after training, max |w rank 0 - w rank 1|: "
          f"{max(diff.values()):.3g}" + (" (no-collective ran: expected to differ)"
                                         if "no-collective" in ms else ""))
    print(json.dumps({"rank0": res[0]["ms"], "rank1": res[1]["ms"]}))
    shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
