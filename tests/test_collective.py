"""Gradient all-reduce: the pure bucket plan, then real 2-process collectives on Ray."""

import time

import numpy as np
import pytest
import ray
import tensorflow as tf

from distributed.errors import ConfigError
from distributed.train import collective
from distributed.train.buckets import Bucket, plan_buckets
from distributed.train.collective import GroupSpec
from tests.helpers.graphs import ancestors

TWO = ("127.0.0.1:1", "127.0.0.1:2")
SHAPES = [(3, 4), (4,), (5, 2, 2), (7,)]  # plus one float64 var, one sparse, one None


# ---------------------------------------------------------------- pure -----

def test_plan_reverse_order_size_bound_and_oversized_alone():
    items = [("float32", 40), ("float32", 30), ("float32", 100), ("float32", 20),
             ("float32", 50)]
    assert plan_buckets(items, bucket_bytes=64) == [
        Bucket("float32", (4,), 50),       # + 20 would be 70 > 64
        Bucket("float32", (3,), 20),       # + 100 would overflow
        Bucket("float32", (2,), 100),      # bigger than a bucket: alone
        Bucket("float32", (1,), 30),
        Bucket("float32", (0,), 40),
    ]
    assert plan_buckets(items, bucket_bytes=1000) == [
        Bucket("float32", (4, 3, 2, 1, 0), 240)]


def test_plan_groups_by_dtype_and_keeps_every_index_once():
    items = [("float32", 8), ("float64", 16), ("float32", 8), ("float64", 16),
             ("float32", 8)]
    plan = plan_buckets(items, bucket_bytes=16)
    # Closed buckets first, in closing order; then open ones in opening order.
    assert plan == [Bucket("float64", (3,), 16), Bucket("float32", (4, 2), 16),
                    Bucket("float64", (1,), 16), Bucket("float32", (0,), 8)]
    assert sorted(i for b in plan for i in b.indices) == list(range(len(items)))
    assert plan_buckets([], 16) == []
    with pytest.raises(ConfigError, match="bucket_bytes"):
        plan_buckets(items, 0)


def test_group_spec_validation_and_hint():
    with pytest.raises(ConfigError, match="rank"):
        GroupSpec(TWO, rank=2)
    with pytest.raises(ConfigError, match="addresses"):
        GroupSpec(("nohost",), rank=0)
    with pytest.raises(ConfigError, match="timeout_seconds"):
        GroupSpec(TWO, rank=0, timeout_seconds=0)
    with pytest.raises(ConfigError, match="communication_hint"):
        GroupSpec(TWO, rank=0, communication_hint="mpi")
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert GroupSpec(TWO, 0).resolved_hint() == ("nccl" if gpu else "ring")
    config = collective.session_config(GroupSpec(list(TWO), 1))
    assert config.experimental.collective_group_leader == "/job:worker/replica:0/task:0"
    assert list(config.device_filters) == ["/job:worker/task:1"]


def _collectives(graph):
    ops = [op for op in graph.get_operations() if op.type == "CollectiveReduceV2"]
    return sorted(ops, key=lambda op: tf.get_static_value(op.inputs[3]))


def test_graph_has_one_collective_per_bucket_with_unique_keys():
    graph = tf.Graph()
    with graph.as_default():
        vs = [tf.compat.v1.get_variable(f"v{i}", s) for i, s in enumerate(SHAPES)]
        pairs = [(tf.ones(v.shape), v) for v in vs] + [(None, vs[0])]
        out = collective.allreduce_gradients(
            pairs, GroupSpec(TWO, 0, communication_hint="nccl"), bucket_bytes=64,
            instance_key_start=7)
    assert [v for _, v in out] == [v for _, v in pairs] and out[-1][0] is None
    assert [g.shape for g, _ in out[:-1]] == [tf.TensorShape(s) for s in SHAPES]
    ops = _collectives(graph)
    assert [tf.get_static_value(op.inputs[3]) for op in ops] == [7, 8, 9]
    assert all(op.get_attr("final_op") == b"Div" for op in ops)
    # An op-level timeout parks 2 threads per launch for the whole timeout.
    assert all(op.get_attr("timeout_seconds") == 0.0 for op in ops)
    # NCCL: each bucket waits on the previous one, so every GPU launches in order.
    assert [ops[i - 1] in ancestors(op) for i, op in enumerate(ops) if i] == [True] * 2
    assert ops[2] not in ancestors(ops[1])


@pytest.mark.parametrize("addresses,hint,mean,op", [
    (TWO, "ring", "auto", "CollectiveGatherV2"),
    (TWO + ("127.0.0.1:3",), "ring", "auto", "CollectiveReduceV2"),
    (TWO, "nccl", "auto", "CollectiveReduceV2"),
    (TWO, "ring", "allreduce", "CollectiveReduceV2"),
    (TWO + ("127.0.0.1:3",), "ring", "gather", "CollectiveGatherV2"),
], ids=["2-ring", "3-ring", "2-nccl", "2-ring-allreduce", "3-ring-gather"])
def test_dense_mean_gathers_for_two_ranks_on_the_ring(addresses, hint, mean, op):
    spec = GroupSpec(addresses, 0, communication_hint=hint, dense_mean=mean)
    graph = tf.Graph()
    with graph.as_default():
        v = tf.compat.v1.get_variable("v", [4, 3])
        collective.allreduce_gradients([(tf.ones([4, 3]), v)], spec)
    ops = [o for o in graph.get_operations() if o.type.startswith("Collective")]
    assert [o.type for o in ops] == [op]
    with pytest.raises(ConfigError, match="dense_mean"):
        GroupSpec(TWO, 0, dense_mean="median")


def test_single_worker_builds_no_collective():
    graph = tf.Graph()
    with graph.as_default():
        v = tf.compat.v1.get_variable("v", [3])
        pairs = [(tf.ones([3]), v), (None, v)]
        assert collective.allreduce_gradients(pairs, GroupSpec(TWO[:1], 0)) == pairs
    assert not _collectives(graph)


# ----------------------------------------------------------- real Ray -----

def _rank_grads(rank: int) -> list[np.ndarray]:
    """Integer-valued gradients, so the float mean of two ranks is exact."""
    rng = np.random.default_rng(rank)
    dense = [rng.integers(-50, 50, s).astype(np.float32) for s in SHAPES]
    return dense + [rng.integers(-50, 50, (2, 3)).astype(np.float64),
                    rng.integers(-50, 50, (3, 5)).astype(np.float32)]


@ray.remote(num_cpus=0.5)
class _Worker:
    def __init__(self):
        self.address = f"{ray.util.get_node_ip_address()}:{collective.pick_free_port()}"

    def get_address(self):
        return self.address

    def setup(self, addresses, rank, timeout_seconds):
        self.spec = GroupSpec(tuple(addresses), rank, timeout_seconds=timeout_seconds)
        self.server = collective.start_server(self.spec)
        graph = tf.Graph()
        with graph.as_default():
            vs = [tf.compat.v1.get_variable(f"v{i}", s) for i, s in enumerate(SHAPES)]
            vs.append(tf.compat.v1.get_variable("w64", [2, 3], tf.float64))
            vs.append(tf.compat.v1.get_variable("emb", [6, 5]))
            grads = [tf.constant(g) for g in _rank_grads(rank)]
            # Sparse gradient of `emb`: rows 1 and 4 (row 4 twice, summed when densified).
            # Gathered it would be 2 x 3 rows x 28 B > 0.5 x 120 B: it goes dense.
            grads[-1] = tf.IndexedSlices(grads[-1], tf.constant([1, 4, 4]),
                                         tf.constant([6, 5]))
            pairs = list(zip(grads, vs)) + [(None, vs[0])]
            out = collective.allreduce_gradients(pairs, self.spec, bucket_bytes=64)
            self.fetch = [g for g, _ in out[:-1]]
        self.sess = tf.compat.v1.Session(self.server.target, graph=graph,
                                         config=collective.session_config(self.spec))
        self.options = collective.run_options(self.spec)
        return len(_collectives(graph))

    def step(self, steps=1):
        start = time.monotonic()
        try:
            for _ in range(steps):
                out = self.sess.run(self.fetch, options=self.options)
            return out, time.monotonic() - start
        except tf.errors.OpError as e:
            return type(e).__name__, time.monotonic() - start

    def threads(self):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _pair(timeout_seconds):
    workers = [_Worker.remote() for _ in range(2)]
    addresses = ray.get([w.get_address.remote() for w in workers])
    ray.get([w.setup.remote(addresses, r, timeout_seconds) for r, w in enumerate(workers)])
    return workers


@pytest.mark.ray
def test_two_workers_get_the_exact_mean(local_ray):
    workers = _pair(timeout_seconds=30.0)
    expected = [(a + b) / 2 for a, b in zip(_rank_grads(0), _rank_grads(1))]
    dense = np.zeros((6, 5), np.float32)
    np.add.at(dense, [1, 4, 4], expected[-1])
    expected[-1] = dense
    threads = ray.get(workers[0].threads.remote())
    for steps in (1, 1, 300):  # later runs reuse the same instance keys
        for got, _ in ray.get([w.step.remote(steps) for w in workers]):
            assert not isinstance(got, str), got
            assert [g.dtype for g in got] == [e.dtype for e in expected]
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g, e)
    # 1,500 collectives later the thread count is flat (no per-launch timer threads).
    assert ray.get(workers[0].threads.remote()) < threads + 50
    for w in workers:
        ray.kill(w)


@pytest.mark.ray
@pytest.mark.parametrize("joined_before", [False, True], ids=["never-joined", "stalled"])
def test_peer_that_does_not_step_fails_the_step_after_the_timeout(local_ray, joined_before):
    workers = _pair(timeout_seconds=3.0)
    if joined_before:
        assert not any(isinstance(out, str) for out, _ in
                       ray.get([w.step.remote(5) for w in workers]))
    error, seconds = ray.get(workers[0].step.remote())  # rank 1 does not run this step
    assert error == "DeadlineExceededError"
    # It waited for the 3 s timeout, and then did not hang: the upper bound is
    # a generous margin for a loaded machine, not a performance claim.
    assert 2.5 < seconds < 60.0
    for w in workers:
        ray.kill(w)


@pytest.mark.ray
def test_killed_peer_fails_the_next_step(local_ray):
    workers = _pair(timeout_seconds=3.0)
    assert not any(isinstance(out, str) for out, _ in
                   ray.get([w.step.remote() for w in workers]))
    ray.kill(workers[1])
    error, seconds = ray.get(workers[0].step.remote())
    assert error in ("UnavailableError", "DeadlineExceededError") and seconds < 60.0
    ray.kill(workers[0])
