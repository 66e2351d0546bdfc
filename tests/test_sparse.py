"""Sparse gradients stay sparse: the density rule, the built graph, and a real
2-process exchange whose result equals the dense all-reduce's."""

import functools

import numpy as np
import pytest
import ray
import tensorflow as tf

from distributed import config as config_lib
from distributed.inputs.spec import InputSpec
from distributed.train import collective, sparse
from distributed.train.collective import GroupSpec
from distributed.train.graph import build_train_graph
from tests.helpers.graphs import ancestors

TWO = ("127.0.0.1:1", "127.0.0.1:2")
EMBEDDING = "distributed.examples.embedding"


# ---------------------------------------------------------------- pure -----

def test_density_rule_gathers_up_to_the_threshold_and_never_at_zero():
    # 2 ranks x 10 rows x (12 value bytes + 8 index bytes) = 400 bytes gathered.
    assert sparse.gathered_bytes(10, 12, 2) == 400
    assert sparse.use_gather(10, 12, dense_bytes=800, group_size=2, threshold=0.5)
    assert not sparse.use_gather(10, 12, dense_bytes=799, group_size=2, threshold=0.5)
    assert not sparse.use_gather(0, 12, dense_bytes=800, group_size=2, threshold=0.0)
    # Unknown rows or dense size: gather (unless the threshold turns it off).
    assert sparse.use_gather(None, 12, 800, 2, 0.5)
    assert sparse.use_gather(10, 12, None, 2, 0.5)
    assert not sparse.use_gather(None, 12, 800, 2, 0.0)


def _lookup_grad(vocab, dim, ids_shape, dtype=tf.float32, reads=1):
    """The table's gradient of a loss that looks ``ids`` up ``reads`` times."""
    table = tf.compat.v1.get_variable("table", [vocab, dim], dtype,
                                      initializer=tf.compat.v1.zeros_initializer())
    ids = [tf.compat.v1.placeholder(tf.int64, ids_shape) for _ in range(reads)]
    loss = tf.math.real(tf.add_n([tf.reduce_sum(tf.nn.embedding_lookup(table, i))
                                  for i in ids]))
    (grad,) = tf.gradients(loss, [table])
    return grad, table


@pytest.mark.parametrize("ids_shape,reads,batch_size,rows", [
    ([64, 8], 1, None, 512),        # static: the indices' own length
    ([None, 8], 1, 64, 512),        # a None batch dimension counts as batch_size
    ([None, 8], 2, 64, 1024),       # a table read twice: the concat of both
    ([None, 8], 1, None, None),     # no batch size given
    ([None, None], 1, 64, None),    # two unknown dimensions
], ids=["static", "batch", "read-twice", "no-batch-size", "ragged"])
def test_rows_are_estimated_from_the_ids_static_shape(ids_shape, reads, batch_size, rows):
    with tf.Graph().as_default():
        grad, _ = _lookup_grad(100, 4, ids_shape, reads=reads)
        assert isinstance(grad, tf.IndexedSlices)
        assert sparse.estimate_rows(grad.indices, batch_size) == rows


@pytest.mark.parametrize("vocab,dtype,threshold,gather", [
    (200_000, tf.float32, 0.5, True),     # 2 x 512 x (64 x 4 + 8) bytes << 51 MB
    (200_000, tf.float32, 0.0, False),    # 0 turns the gather off
    (2_000, tf.float32, 0.5, False),      # 270,336 B gathered > 0.5 x 512,000 B
    (2_000, tf.float32, 1.0, True),       # ... <= 1 x 512,000 B
    (200_000, tf.complex128, 0.5, False),  # cannot carry int64 indices in columns
], ids=["big-table", "threshold-0", "small-table", "small-table-threshold-1", "complex"])
def test_density_fallback_is_decided_from_static_shapes(vocab, dtype, threshold, gather):
    with tf.Graph().as_default():
        grad, table = _lookup_grad(vocab, 64, [None, 8], dtype)
        assert sparse.should_gather(grad, table, 2, threshold, batch_size=64) is gather


# ------------------------------------------------------------ the graph -----

def _key(op) -> int:
    """A collective's instance key; a padded gather's is ``first + size class``:
    its first key."""
    key = op.inputs[3]
    static = tf.get_static_value(key)
    if static is None:
        static = next(v for v in map(tf.get_static_value, key.op.inputs) if v is not None)
    return int(static)


def _collectives(graph):
    ops = [op for op in graph.get_operations() if op.type.startswith("Collective")]
    return sorted(ops, key=_key)


def _embedding_train_graph(hint: str, threshold: float, vocab: int = 200_000):
    cfg = config_lib.from_dict({
        "model": f"{EMBEDDING}:embedding_model_fn",
        "input": f"{EMBEDDING}:embedding_input_fn",
        "model_params": {"vocab": vocab, "dim": 64}, "batch_size": 64,
        "optimizer": {"name": "adagrad", "learning_rate": 0.1},
        "sparse_density_threshold": threshold})
    reduce_fn = functools.partial(
        collective.allreduce_gradients,
        # (Dense buckets all-reduced, as with NCCL: the sparse exchange is tested.)
        spec=GroupSpec(TWO, 0, communication_hint=hint, dense_mean="allreduce"),
        sparse_density_threshold=cfg.sparse_density_threshold, batch_size=cfg.batch_size)
    return build_train_graph(cfg, InputSpec({"ids": ("int64", (8,))}, ("int64", ())),
                             reduce_fn=reduce_fn).graph


def test_train_graph_gathers_the_table_gradient_and_never_reduces_the_table():
    graph = _embedding_train_graph("ring", 0.5)
    ops = _collectives(graph)
    reduced = [op.inputs[0].shape.num_elements() for op in ops
               if op.type == "CollectiveReduceV2"]
    assert reduced == [64 * 4 + 4]  # the head's kernel and bias only
    gathers = [op for op in ops if op.type == "CollectiveGatherV2"]
    assert [g.inputs[0].dtype for g in gathers] == [tf.int64, tf.float32]  # counts, rows
    applies = {op.type for op in graph.get_operations() if "Apply" in op.type}
    assert applies == {"ResourceSparseApplyAdagrad", "ResourceApplyAdagrad"}
    # The dense fallback (threshold 0): the table's 12.8 M elements all-reduced
    # (in a bucket of its own: it is bigger than bucket_bytes).
    dense = _embedding_train_graph("ring", 0.0)
    assert {op.type for op in _collectives(dense)} == {"CollectiveReduceV2"}
    assert sorted(op.inputs[0].shape.num_elements() for op in _collectives(dense)) == [
        64 * 4 + 4, 200_000 * 64]


def test_nccl_launches_every_collective_in_one_chain_with_unique_keys():
    ops = _collectives(_embedding_train_graph("nccl", 0.5))
    start = collective.DEFAULT_INSTANCE_KEY_START
    assert [_key(op) for op in ops] == [start, start + 1, start + 2]
    # The rows' count is not static: one key per size class, reserved.
    assert tf.get_static_value(ops[-1].inputs[3]) is None
    # Row counts first (they need only the ids), the dense bucket, the rows.
    assert [op.type for op in ops] == ["CollectiveGatherV2", "CollectiveReduceV2",
                                       "CollectiveGatherV2"]
    assert all(ops[i - 1] in ancestors(op) for i, op in enumerate(ops) if i)
    assert all(op.get_attr("communication_hint") == b"nccl" for op in ops)


def test_single_worker_returns_sparse_pairs_untouched():
    with tf.Graph().as_default() as graph:
        grad, table = _lookup_grad(100, 4, [None, 8])
        pairs = [(grad, table)]
        assert collective.allreduce_gradients(pairs, GroupSpec(TWO[:1], 0)) == pairs
    assert not _collectives(graph)


# ------------------------------------------------------ real 2 processes -----

# Indices whose int32 halves are NaN/Inf bit patterns as float32: they travel
# bitcast into float32 columns and must come back bit for bit.
ODD_INDICES = [0x7F800001, (0x7FC00001 << 32) | 0x7F800001, 0xFFFFFFFF, 5]
# Rows a step of each unknown-length gradient: ((float32 rank 0, rank 1), (float64 ...)).
STEPS = [((3, 5), (2, 0)), ((6, 0), (4, 4)), ((1, 1), (0, 3)), ((0, 0), (2, 1))]


def _static_grads(rank):
    """(values, indices, shape, dtype) of the static-length gradients: integer
    values (so means of two ranks are exact), duplicate indices."""
    rng = np.random.default_rng(10 + rank)
    return [(rng.integers(-50, 50, (4, 3)), [[1, 4, 4, 7], [4, 9, 9, 1]][rank], (50, 3),
             np.float32),
            (rng.integers(-50, 50, (3, 2, 2)), [[0, 2, 2], [39, 0, 2]][rank], (40, 2, 2),
             np.float16)]


def _dynamic_feed(rank, step):
    """``(values, indices)`` of the two unknown-length gradients (float32 [30, 2],
    float64 [20, 3]) at ``step``."""
    rng = np.random.default_rng([rank, step])
    out = []
    for rows, (vocab, width, dtype) in zip(STEPS[step][rank], ((30, 2, np.float32),
                                                              (20, 3, np.float64))):
        out.append((rng.integers(-50, 50, (rows, width)).astype(dtype),
                    rng.integers(0, vocab, rows).astype(np.int32)))
    return out


@ray.remote(num_cpus=0.5)
class _SparseWorker:
    def __init__(self):
        self.address = f"{ray.util.get_node_ip_address()}:{collective.pick_free_port()}"

    def get_address(self):
        return self.address

    def setup(self, addresses, rank):
        self.spec = GroupSpec(tuple(addresses), rank, timeout_seconds=60.0,
                              dense_mean="allreduce")
        self.server = collective.start_server(self.spec)
        graph = tf.Graph()
        with graph.as_default():
            pairs = [(tf.constant(np.arange(5, dtype=np.float32) * (rank + 1)),
                      tf.compat.v1.get_variable("dense", [5]))]
            for i, (values, indices, shape, dtype) in enumerate(_static_grads(rank)):
                var = tf.compat.v1.get_variable(f"static{i}", shape, tf.as_dtype(dtype))
                pairs.append((tf.IndexedSlices(tf.constant(values, dtype),
                                               tf.constant(indices), shape), var))
            self.feeds = []
            for i, (vocab, width, dtype) in enumerate(((30, 2, tf.float32),
                                                        (20, 3, tf.float64))):
                values = tf.compat.v1.placeholder(dtype, [None, width])
                indices = tf.compat.v1.placeholder(tf.int32, [None])
                self.feeds.append((values, indices))
                var = tf.compat.v1.get_variable(f"dynamic{i}", [vocab, width], dtype)
                pairs.append((tf.IndexedSlices(values, indices, [vocab, width]), var))
            odd = tf.IndexedSlices(tf.constant([[1.0], [-0.0], [np.inf], [-3.0]]),
                                   tf.constant(ODD_INDICES, tf.int64), [2**62, 1])
            gathered = collective.allreduce_gradients(
                pairs + [(odd, None)], self.spec, sparse_density_threshold=1.0)
            reference = collective.allreduce_gradients(
                pairs, self.spec, instance_key_start=2000, sparse_density_threshold=0.0)
            self.types = [op.type for op in _collectives(graph)]
            self.fetch = {
                "sparse": [(g.indices, g.values) if isinstance(g, tf.IndexedSlices) else g
                           for g, _ in gathered],
                "dense": [g for g, _ in reference]}
        self.sess = tf.compat.v1.Session(self.server.target, graph=graph,
                                         config=collective.session_config(self.spec))

    def step(self, step):
        feed = {}
        for (values, indices), arrays in zip(self.feeds,
                                             _dynamic_feed(self.spec.rank, step)):
            feed[values], feed[indices] = arrays
        out = self.sess.run(self.fetch, feed, options=collective.run_options(self.spec))
        return dict(out, types=self.types)


def _densify(indices, values, shape):
    dense = np.zeros(shape, values.dtype)
    np.add.at(dense, indices, values)
    return dense


def _expected_sparse_means(step):
    """Per gradient after the dense one, numpy's ``(indices, values, dense)``:
    both ranks' rows, rank-major, values halved, and their dense mean."""
    expected = []
    per_rank = [[(np.asarray(v, d), i, s) for v, i, s, d in _static_grads(r)]
                + [(v, i, (30, 2) if n == 0 else (20, 3))
                   for n, (v, i) in enumerate(_dynamic_feed(r, step))] for r in (0, 1)]
    for (v0, i0, shape), (v1, i1, _) in zip(*per_rank):
        expected.append((np.concatenate([i0, i1]), np.concatenate([v0, v1]) / 2,
                         (_densify(i0, v0, shape) + _densify(i1, v1, shape)) / 2))
    return expected


@pytest.mark.ray
def test_gathered_slices_equal_the_dense_all_reduce(local_ray):
    workers = [_SparseWorker.remote() for _ in range(2)]
    addresses = ray.get([w.get_address.remote() for w in workers])
    ray.get([w.setup.remote(addresses, r) for r, w in enumerate(workers)])
    for step in range(len(STEPS)):  # row counts change across steps and ranks
        outs = ray.get([w.step.remote(step) for w in workers])
        for out in outs:
            sparse_out, dense_out = out["sparse"], out["dense"]
            np.testing.assert_array_equal(sparse_out[0], dense_out[0])
            np.testing.assert_array_equal(dense_out[0], np.arange(5) * 1.5)
            for k, (rows, halves, mean) in enumerate(_expected_sparse_means(step), 1):
                indices, values = sparse_out[k]
                # Exactly every rank's rows (no padding left), halved.
                np.testing.assert_array_equal(indices, rows)
                assert values.dtype == mean.dtype
                np.testing.assert_array_equal(values, halves)
                np.testing.assert_array_equal(
                    _densify(indices, values, mean.shape), dense_out[k])
                np.testing.assert_array_equal(dense_out[k], mean)
            indices, values = sparse_out[-1]
            assert list(indices) == ODD_INDICES * 2
            np.testing.assert_array_equal(
                values.view(np.uint32).ravel(),
                np.array([0.5, -0.0, np.inf, -1.5] * 2, np.float32).view(np.uint32))
        # Both ranks got the same bytes: replicas apply the same update.
        for a, b in zip(outs[0]["sparse"][1:], outs[1]["sparse"][1:]):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    # The sparse call: row counts, one dense bucket, four row gathers (float32
    # static, which the odd indices share, float16, float32 padded, float64
    # padded); then the reference's three dense buckets (one per dtype).
    gather, reduce = "CollectiveGatherV2", "CollectiveReduceV2"
    assert outs[0]["types"] == [gather, reduce] + [gather] * 4 + [reduce] * 3
    for w in workers:
        ray.kill(w)
