"""Smoke test for the first machine with 1 or 2 GPUs: one line per check.

    python scripts/gpu_smoke.py          # from the repository root; < 3 minutes

Checks, each on the GPU where TensorFlow sees one, else its CPU path (said on
the line):

1. placement: every example's train graph (the ``steps_per_run`` loop; one step
   with parameter servers) as a GPU worker builds it: the kernel registry's verdict per op
   (``distributed.train.placement``); on a GPU also one real step of the
   examples with CPU-only ops, traced, counting where ops ran.
2. two ranks (Ray actors) exchange a dense and a sparse gradient with unequal,
   run-time row counts (padded gathers, int64 counts), once and in an in-graph
   loop of 3 steps: NCCL with 2 GPUs, else the ring on CPU (NCCL refuses two
   ranks on one GPU). The means are checked exactly; the trace says where the
   collectives ran.
3. tf.data prefetched to the GPU (``DatasetSource(gpu=True)``) in a worker's
   Session on its TF server; on CPU ``prefetch_to_device`` to CPU:0 there.
   With its position saved (``input_position: exact``), the iterator on the
   CPU beside a GPU step: the position taken in the step's run restores to
   the same next batches.
4. the snapshot (``distributed.train.snapshot``) of GPU variables: values as
   of ``take``, after the variables change.
5. the actors that hold no GPU: a real Coordinator with an evaluator, as a
   ``num_gpus=0`` Ray actor, sees no GPU and (nvidia-smi) holds no GPU memory.

Exits 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np  # noqa: E402

import distributed  # noqa: E402,F401  (the one TF world's environment)
from distributed import logs  # noqa: E402

logs.quiet_native_stderr()
import tensorflow as tf  # noqa: E402

GPUS = len(tf.config.list_physical_devices("GPU"))
PATH = "GPU" if GPUS else "CPU path: no GPU visible to TensorFlow"
DEVICE = "/device:GPU:0" if GPUS else "/device:CPU:0"
RESULTS: list[bool] = []


def line(ok: bool, name: str, text: str) -> None:
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {name}: {text}", flush=True)


def check(name: str):
    """Runs the decorated check now; an exception is a FAIL line."""
    def run(fn):
        start = time.perf_counter()
        try:
            ok, text = fn()
        except Exception as e:  # one line, then on with the other checks
            ok, text = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if os.environ.get("DTR_VERBOSE"):
                traceback.print_exc()
        line(ok, name, f"{text} [{time.perf_counter() - start:.1f}s]")
        return fn
    return run


def _worker_server(rank: int = 0, addresses=None):
    from distributed.train import collective
    spec = collective.GroupSpec(
        tuple(addresses or (f"localhost:{collective.pick_free_port()}",)), rank)
    return spec, collective.start_server(spec)


_SERVER = None


def _session(graph):
    """A one-worker Session as ``Worker.setup`` makes one (one TF server a process)."""
    global _SERVER
    from distributed.train import collective
    if _SERVER is None:
        _SERVER = _worker_server()
    spec, server = _SERVER
    return tf.compat.v1.Session(server.target, graph=graph,
                                config=collective.session_config(spec))


# ------------------------------------------------------------------ checks


def placement():
    from distributed.train.placement import check_gpu_placement
    from tests.helpers import placement_cases as pc
    records = tempfile.mkdtemp(prefix="gpu-smoke-")
    try:
        cases = pc.cases(records)
        for name, case in cases.items():
            @check(f"placement {name}")
            def _(name=name, case=case):
                report = check_gpu_placement(pc.build(case, "train",
                                                      steps_per_run=pc.loop_steps(case)))
                ok = not report.unplaceable and all(
                    d.endswith("/device:GPU:0") and k for _, _, d, k in report.collectives)
                text = report.summary()
                if GPUS and name in ("wide_deep", "digits_mlp_piecewise"):
                    text += "; one step on GPU:0: " + _one_gpu_step(case)
                return ok, f"{text} ({PATH if not GPUS else 'registry + a real step'})"
    finally:
        shutil.rmtree(records, ignore_errors=True)


def _one_gpu_step(case) -> str:
    """One traced training step of a one-worker graph pinned to GPU:0."""
    from distributed import config as config_lib
    from distributed.inputs import probe_spec
    from distributed.train.graph import build_train_graph
    cfg = config_lib.from_dict({**case, "workers": 1})
    spec = probe_spec(cfg)
    tg = build_train_graph(cfg, spec, device="/device:GPU:0")
    batch = next(iter(_batches(cfg)))
    feed = {tg.features[k]: v for k, v in batch[0].items()}
    feed[tg.labels] = batch[1]
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    meta = tf.compat.v1.RunMetadata()
    with _session(tg.graph) as sess:
        if hasattr(tg, "initializers"):
            tg.initializers.run(sess)
        else:
            sess.run(tg.init_op)
        loss = sess.run([tg.train_op, tg.loss], feed, options=options, run_metadata=meta)[1]
    where = {"GPU": 0, "CPU": 0}
    for dev in meta.step_stats.dev_stats:
        kind = "GPU" if "GPU" in dev.device.upper() else "CPU"
        where[kind] += len(dev.node_stats)
    return f"loss {loss:.3f}, {where['GPU']} ops ran on a GPU, {where['CPU']} on the CPU"


def _batches(cfg):
    from distributed.model import load_function
    fn = load_function(cfg.input_ref, "input", 4)
    return fn(0, 1, 8, dict(cfg.input_params))


class _Rank:
    """One rank of the exchange check (a Ray actor)."""

    def __init__(self):
        from distributed.train import collective
        import ray
        self.address = f"{ray.util.get_node_ip_address()}:{collective.pick_free_port()}"

    def get_address(self):
        return self.address

    def run(self, addresses, rank, device):
        import numpy as np
        import tensorflow as tf

        from distributed.train import collective
        spec = collective.GroupSpec(tuple(addresses), rank, timeout_seconds=120.0)
        server = collective.start_server(spec)
        rows = 3 + 2 * rank  # unequal on the two ranks, known only at run time
        graph = tf.Graph()
        with graph.as_default(), tf.device(device):
            dense_var = tf.compat.v1.get_variable("dense", [64, 32])
            table = tf.compat.v1.get_variable("table", [1000, 8])
            ids = tf.compat.v1.placeholder(tf.int64, [None], name="ids")
            values = tf.compat.v1.placeholder(tf.float32, [None, 8], name="values")
            dense = tf.fill([64, 32], float(rank + 1))
            pairs = [(dense, dense_var),
                     (tf.IndexedSlices(values, ids, tf.constant([1000, 8], tf.int64)), table)]
            out = collective.allreduce_gradients(pairs, spec, batch_size=8)
            sparse = tf.convert_to_tensor(out[1][0])

            def body(i, acc):  # the steps_per_run loop: collectives in a loop frame
                step = [(dense * tf.cast(i + 1, tf.float32), dense_var)]
                mean = collective.allreduce_gradients(step, spec, instance_key_start=5000)
                return i + 1, acc + mean[0][0]

            _, looped = tf.compat.v1.while_loop(
                lambda i, _: i < 3, body, [tf.constant(0), tf.zeros([64, 32])],
                parallel_iterations=1)
        feed = {ids: np.arange(rows) * (rank + 1), values: np.ones([rows, 8], np.float32)}
        options = collective.run_options(spec)
        options.trace_level = tf.compat.v1.RunOptions.FULL_TRACE
        meta = tf.compat.v1.RunMetadata()
        with tf.compat.v1.Session(server.target, graph=graph,
                                  config=collective.session_config(spec)) as sess:
            got = sess.run([out[0][0], sparse, looped], feed, options=options,
                           run_metadata=meta)
        ran = sorted({dev.device.split("/")[-1] for dev in meta.step_stats.dev_stats
                      for node in dev.node_stats if "Collective" in node.node_name})
        return {"hint": spec.resolved_hint(), "got": got, "ran": ran}


def exchange():
    @check("two ranks: dense + sparse (unequal rows) + loop")
    def _():
        import ray
        if GPUS >= 2:
            gpus, device, env, how = 1, "/device:GPU:0", {}, "NCCL on 2 GPUs"
        else:
            gpus, device, env = 0, None, {"CUDA_VISIBLE_DEVICES": ""}
            how = ("ring on CPU: 1 GPU, and NCCL refuses two ranks on one GPU" if GPUS
                   else f"ring on CPU ({PATH})")
        actor = ray.remote(num_cpus=0.5, num_gpus=gpus)(_Rank)
        ranks = [actor.options(runtime_env={"env_vars": env}).remote() for _ in range(2)]
        try:
            addresses = ray.get([r.get_address.remote() for r in ranks])
            results = ray.get([r.run.remote(addresses, i, device)
                               for i, r in enumerate(ranks)], timeout=240)
        finally:
            for r in ranks:
                ray.kill(r)
        want_dense = np.full([64, 32], 1.5, np.float32)
        want_sparse = np.zeros([1000, 8], np.float32)
        for rank in range(2):
            want_sparse[np.arange(3 + 2 * rank) * (rank + 1)] += 0.5
        want_loop = want_dense * (1 + 2 + 3)
        ok = all(np.array_equal(r["got"][0], want_dense)
                 and np.array_equal(r["got"][1], want_sparse)
                 and np.array_equal(r["got"][2], want_loop) for r in results)
        hints = sorted({r["hint"] for r in results})
        return ok, (f"means exact on both ranks={ok}, hint {hints}, collectives ran on "
                    f"{sorted({d for r in results for d in r['ran']})} ({how})")


def prefetch():
    @check("tf.data prefetch to the device")
    def _():
        from distributed.inputs.sources import DatasetSource
        graph = tf.Graph()
        with graph.as_default():
            data = tf.data.Dataset.range(10).map(
                lambda i: ({"x": tf.fill([2], tf.cast(i, tf.float32))}, i)).batch(2)
            if GPUS:
                source = DatasetSource(data, "smoke", 0, gpu=True)
            else:
                data = data.apply(tf.data.experimental.prefetch_to_device("/device:CPU:0"))
                source = DatasetSource(data, "smoke", 0)
            features, labels = source.tensors()
        with _session(graph) as sess:
            source.start(sess)
            got = [sess.run(labels).tolist() for _ in range(3)]
        ok = got == [[0, 1], [2, 3], [4, 5]]
        return ok, (f"3 batches in order={ok}, read on {features['x'].device or 'default'} "
                    f"in a /job:worker Session"
                    + ("" if GPUS else f" ({PATH}: prefetch_to_device to CPU:0)"))


def position_on_gpu():
    @check("tf.data input position on a GPU worker")
    def _():
        from distributed.inputs.sources import DatasetSource
        graph = tf.Graph()
        with graph.as_default():
            data = tf.data.Dataset.range(64).shuffle(16, seed=3).repeat().batch(4).map(
                lambda i: ({"x": tf.cast(i, tf.float32)}, i))
            # input_position: exact (the default) on a GPU worker: the iterator
            # stays on the CPU (prefetch_to_device cannot be saved).
            source = DatasetSource(data, "smoke", 0, gpu=bool(GPUS), saves_position=True)
            features, labels = source.tensors()
            with tf.device(DEVICE):
                doubled = features["x"] * 2.0
            in_step = source.position_after([labels])
        with _session(graph) as sess:
            source.start(sess)
            source.check_position(sess)
            for _ in range(3):
                sess.run(doubled)
            _, position = sess.run([doubled, in_step])
            after = [sess.run(labels).tolist() for _ in range(3)]
            source.restore_position(sess, position)
            again = [sess.run(labels).tolist() for _ in range(3)]
        ok = after == again
        return ok, (f"restored position reads the same next batches={ok} "
                    f"({len(position)} B), the step's math on {DEVICE}"
                    + ("" if GPUS else f" ({PATH})"))


def snapshot():
    @check("snapshot")
    def _():
        from distributed.train.snapshot import VariableSnapshot
        graph = tf.Graph()
        with graph.as_default(), tf.device(DEVICE):
            v = tf.compat.v1.get_variable("w", initializer=tf.ones([256, 64]))
            bump = v.assign_add(tf.ones([256, 64]))
            snap = VariableSnapshot([v], {"all": ["w"]})
            init = tf.compat.v1.global_variables_initializer()
        with _session(graph) as sess:
            sess.run(init)
            snap.take(sess, "all")
            sess.run(bump)
            got = snap.fetch(sess, "all")["w"]
            now = sess.run(v)
        ok = np.all(got == 1.0) and np.all(now == 2.0)
        return ok, (f"values as of take={ok} for a variable on {v.device}"
                    + ("" if GPUS else f" ({PATH})"))


def idle_actors():
    @check("actors that hold no GPU")
    def _():
        import ray

        from distributed import config as config_lib
        storage = tempfile.mkdtemp(prefix="gpu-smoke-storage-")
        try:
            cfg = config_lib.load(os.path.join(REPO_ROOT, "jobs", "configs",
                                               "digits_eval.yaml"),
                                  {"storage": storage, "workers": 1})
            from distributed.train.coordinator import remote_class
            coordinator = remote_class(_ProbedCoordinator).options(
                num_cpus=0.25, num_gpus=0).remote(cfg.to_dict())
            try:
                ray.get(coordinator.build.remote())
                state = ray.get(coordinator.gpu_state.remote())
            finally:
                ray.kill(coordinator)
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        used = _gpu_memory_of(state["pid"]) if GPUS else None
        ok = state["gpus"] == 0 and state["visible"] == "" and not used
        return ok, (f"coordinator + evaluator: TensorFlow sees {state['gpus']} GPU(s), "
                    f"CUDA_VISIBLE_DEVICES={state['visible']!r}, GPU memory "
                    f"{'none held' if not used else f'{used} MiB'}"
                    + ("" if GPUS else f" ({PATH}: nvidia-smi not consulted)"))


def _gpu_memory_of(pid: int) -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True)
    return sum(int(m) for p, m in (row.split(",") for row in out.stdout.splitlines()
                                   if row.strip()) if int(p) == pid)


def _coordinator_cls():
    from distributed.train.coordinator import Coordinator

    class ProbedCoordinator(Coordinator):
        def gpu_state(self):
            import tensorflow as tf
            return {"pid": os.getpid(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "gpus": len(tf.config.list_physical_devices("GPU"))}
    return ProbedCoordinator


_ProbedCoordinator = None


def main() -> int:
    global _ProbedCoordinator
    import ray
    start = time.perf_counter()
    print(f"gpu_smoke: TensorFlow {tf.__version__} (CUDA build: "
          f"{tf.test.is_built_with_cuda()}), {GPUS} GPU(s) visible"
          + ("" if GPUS else f"; {PATH}: every check runs its CPU path"), flush=True)
    placement()
    prefetch()
    position_on_gpu()
    snapshot()
    ray.init(address="local", num_cpus=4, num_gpus=GPUS, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {
                 "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "2",
                 "TF_USE_LEGACY_KERAS": "1"}})
    try:
        _ProbedCoordinator = _coordinator_cls()
        exchange()
        idle_actors()
    finally:
        ray.shutdown()
    passed = sum(RESULTS)
    print(f"gpu_smoke: {passed}/{len(RESULTS)} checks passed in "
          f"{time.perf_counter() - start:.0f}s", flush=True)
    return 0 if passed == len(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
