"""Gradient all-reduce on TensorFlow's own collective runtime.

Each worker runs an in-process ``tf.distribute.Server`` (job ``worker``,
task = rank) and a graph-mode Session that targets it. Gradients never pass
through Python or the Ray object store: ``CollectiveReduceV2`` ops inside the
worker graph exchange them over gRPC (``ring``) or NCCL, overlapped with the
rest of backprop, packed into a few buckets because each launch has a fixed
cost. Sparse gradients (``tf.IndexedSlices``) are all-gathered instead where
that sends fewer bytes (:mod:`distributed.train.sparse`).

Caller's steps, per worker (``rank`` 0..N-1)::

    port = pick_free_port()                        # report host:port to driver
    spec = GroupSpec(addresses=all_addresses, rank=rank)
    server = start_server(spec)                    # before any Session
    with graph.as_default():
        grads_and_vars = allreduce_gradients(grads_and_vars, spec)
    sess = tf.compat.v1.Session(server.target, graph=graph,
                                config=session_config(spec))
    sess.run(train_op, feeds, options=run_options(spec))   # every step

A stalled peer ends the step with ``DeadlineExceededError`` (via
``run_options``), a dead one with ``UnavailableError``. Treat either as fatal
for the whole group: restart every worker and reload variables. A retried
step would pair with a peer's other step, bucket by bucket, and replicas
could silently diverge.

Every worker must build the same graph (same variables, same order, same
``bucket_bytes``, ``instance_key_start``, ``sparse_density_threshold`` and
``batch_size``): the bucket plan, the sparse/dense choice and the instance
keys are derived from it and must match across ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from typing import Any, Sequence

import tensorflow as tf

from distributed.errors import ConfigError
from distributed.train import sparse
from distributed.train.buckets import DEFAULT_BUCKET_BYTES, plan_buckets

JOB_NAME = "worker"
GROUP_LEADER = f"/job:{JOB_NAME}/replica:0/task:0"
DEFAULT_INSTANCE_KEY_START = 1000
_HINTS = ("auto", "ring", "nccl")
_MEANS = ("auto", "allreduce", "gather")
# What NCCL carries in TF 2.21 (nccl_manager.cc, kValidDataTypes): no bfloat16.
NCCL_DTYPES = frozenset({tf.float16, tf.float32, tf.float64, tf.int32, tf.int64})


def pick_free_port() -> int:
    """Returns a TCP port that was free a moment ago.

    The OS picks it (bind to port 0) but the socket closes before TF's server
    binds it, so another process can take it in between: start the server
    soon after, and on failure restart the group with new ports.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """One worker's place in a collective group.

    Attributes:
        addresses: ``host:port`` of every worker's TF server, indexed by rank;
            identical on every worker.
        rank: This worker's index in ``addresses`` (its TF task index).
        group_key: Identifies the group to TF's collective runtime; every op
            with this key must run on the same set of devices.
        timeout_seconds: Longest a step may take (compute included) before it
            fails with ``DeadlineExceededError``, so a dead or stalled worker
            cannot hang the job. Applied per ``Session.run`` by
            :func:`run_options`, not on the collective op (see
            :func:`allreduce_gradients`).
        communication_hint: ``"ring"`` (gRPC, any device), ``"nccl"`` (GPUs)
            or ``"auto"``: ``"nccl"`` where this process sees a GPU, else
            ``"ring"``.
        dense_mean: How a dense bucket's mean is taken: ``"allreduce"``
            (``CollectiveReduceV2``), ``"gather"`` (``CollectiveGatherV2``,
            then a local sum in rank order) or ``"auto"``: gather for two
            ranks on the ring, else all-reduce (see :meth:`mean_by_gather`).
        servers: ``host:port`` of every parameter server's TF server (job
            ``ps`` of the same cluster, :mod:`distributed.train.ps`), by task;
            empty without servers. They never join the collectives.
    """

    addresses: tuple[str, ...]
    rank: int
    group_key: int = 1
    timeout_seconds: float = 60.0
    communication_hint: str = "auto"
    dense_mean: str = "auto"
    servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))
        object.__setattr__(self, "servers", tuple(self.servers))
        if not self.addresses or not all(
                isinstance(a, str) and a.rpartition(":")[2].isdigit()
                for a in self.addresses):
            raise ConfigError(f"addresses: expected a non-empty list of 'host:port', "
                              f"got {self.addresses!r}")
        if not 0 <= self.rank < len(self.addresses):
            raise ConfigError(f"rank: expected 0..{len(self.addresses) - 1}, "
                              f"got {self.rank!r}")
        if self.timeout_seconds <= 0:
            raise ConfigError(f"timeout_seconds: expected > 0 (0 would wait forever "
                              f"on a dead peer), got {self.timeout_seconds!r}")
        if self.communication_hint not in _HINTS:
            raise ConfigError(f"communication_hint: expected one of {_HINTS}, "
                              f"got {self.communication_hint!r}")
        if self.dense_mean not in _MEANS:
            raise ConfigError(f"dense_mean: expected one of {_MEANS}, "
                              f"got {self.dense_mean!r}")

    @property
    def group_size(self) -> int:
        """Number of workers in the group."""
        return len(self.addresses)

    @property
    def task_device(self) -> str:
        """This worker's device prefix, ``/job:worker/replica:0/task:<rank>``."""
        return f"/job:{JOB_NAME}/replica:0/task:{self.rank}"

    def mean_by_gather(self) -> bool:
        """Whether dense means are all-gathered and summed locally.

        Two ranks exchange the same bytes either way, but the ring all-reduce
        takes two rounds (reduce-scatter, then all-gather) where a gather
        takes one; a step's collectives are latency-bound at these sizes, and
        on loopback gRPC a gather of the digits MLP's 340 KB of gradients takes
        ~20% less time than its all-reduce (1.16 vs 1.44 ms,
        ``scripts/_bench_peer_profile.py``: allgather-only vs allreduce-only).
        With more ranks the gathered bytes grow with the group, and NCCL's
        all-reduce is left as it is. The sum runs in rank order on every
        rank, so replicas get the same bits.
        """
        if self.dense_mean != "auto":
            return self.dense_mean == "gather"
        return self.group_size == 2 and self.resolved_hint() == "ring"

    def resolved_hint(self) -> str:
        """The communication hint after resolving ``"auto"`` for this process."""
        if self.communication_hint != "auto":
            return self.communication_hint
        return "nccl" if tf.config.list_physical_devices("GPU") else "ring"


def session_config(spec: GroupSpec,
                   base: tf.compat.v1.ConfigProto | None = None
                   ) -> tf.compat.v1.ConfigProto:
    """A ConfigProto for the server and for every Session that targets it.

    ``collective_group_leader`` tells the collective runtime which task
    resolves group membership and hands out step-id sequences (without it a
    cross-process collective never completes). ``device_filters`` keeps the
    Session's view to this worker's own devices: unplaced ops land here, not
    on task 0, and the master never contacts peers for graph partitioning.

    ``allow_soft_placement``: a GPU worker builds its whole step under
    ``/device:GPU:0``, and an op with no GPU kernel (string ops, the string
    constant of an ``Assert``, ``tf.print``, ``py_function``) would fail the
    first ``Session.run`` with "Could not satisfy explicit device
    specification"; with it that op runs on this worker's CPU (TF's own
    distribute coordinator turns it on too). The collectives are placed on
    the GPU explicitly (:class:`_Launcher`) and have GPU kernels for the
    dtypes they get, so they stay there (``tests/test_placement.py``).
    ``gpu_options.allow_growth``: the server creates the GPU device when it
    starts, and TF's default reserves nearly all of the GPU's memory then; a
    worker takes only what its steps use instead (``TF_FORCE_GPU_ALLOW_GROWTH=
    false`` in the workers' environment restores the default).

    Args:
        spec: This worker's group.
        base: Options to start from (thread pools, GPU options); copied.
    """
    config = tf.compat.v1.ConfigProto()
    if base is not None:
        config.CopyFrom(base)
    config.allow_soft_placement = True
    config.gpu_options.allow_growth = True
    config.experimental.collective_group_leader = GROUP_LEADER
    if spec.resolved_hint() == "nccl":
        config.experimental.collective_nccl = True
    del config.device_filters[:]
    config.device_filters.append(f"/job:{JOB_NAME}/task:{spec.rank}")
    if spec.servers:  # the parameter servers' variables are read and written remotely
        config.device_filters.append("/job:ps")
    return config


def run_options(spec: GroupSpec) -> tf.compat.v1.RunOptions:
    """RunOptions that fail a step after ``spec.timeout_seconds``.

    Pass them to every ``Session.run`` that executes collectives, so a
    stalled peer ends the step instead of hanging it. Unlike the op's own
    ``timeout_seconds`` this costs nothing per step.
    """
    return tf.compat.v1.RunOptions(timeout_in_ms=max(1, int(spec.timeout_seconds * 1000)))


def start_server(spec: GroupSpec,
                 base: tf.compat.v1.ConfigProto | None = None
                 ) -> tf.distribute.Server:
    """Starts this worker's in-process TF server (job ``worker``, task = rank).

    The server's default session config must carry the group leader: its
    collective executor is built from it when the server starts, not from a
    later Session's config. Keep a reference to the server for the life of
    the process; it cannot be stopped, only abandoned with the process.
    """
    jobs = {JOB_NAME: list(spec.addresses)}
    if spec.servers:
        jobs["ps"] = list(spec.servers)
    cluster = tf.train.ClusterSpec(jobs)
    return tf.distribute.Server(cluster, job_name=JOB_NAME, task_index=spec.rank,
                                protocol="grpc", config=session_config(spec, base),
                                start=True)


def _dense(grad: Any) -> tf.Tensor:
    """IndexedSlices become dense (a full-size reduction; see allreduce_gradients)."""
    if isinstance(grad, tf.IndexedSlices):
        return tf.convert_to_tensor(grad)
    return grad


def _static_shape(grad: tf.Tensor, var: Any) -> tf.TensorShape:
    """The gradient's static shape, completed from its variable's."""
    shape = grad.shape
    if not shape.is_fully_defined() and hasattr(var, "shape"):
        shape = shape.merge_with(var.shape)
    return shape


class _Launcher:
    """Builds the group's collectives in launch order, one instance key each.

    With NCCL each collective waits on the previous one's output, so every GPU
    launches them in the same order (NCCL deadlocks otherwise); the ring
    transport matches peers by instance key and needs no ordering.
    """

    def __init__(self, spec: GroupSpec, first_key: int):
        self._spec = spec
        self._hint = spec.resolved_hint()
        self._key = first_key
        self._previous: tf.Tensor | None = None
        # NCCL runs on this worker's GPU: placed there explicitly, so the
        # worker's soft placement (session_config) never moves one to the CPU.
        self._device = (f"{spec.task_device}/device:GPU:0" if self._hint == "nccl"
                        else None)

    def _placed(self):
        return tf.device(self._device) if self._device else contextlib.nullcontext()

    def _launch(self, op: Any, tensor: tf.Tensor, key_offset: Any = None, keys: int = 1,
                **attrs: Any) -> tf.Tensor:
        if self._hint == "nccl" and tensor.dtype.base_dtype not in NCCL_DTYPES:
            raise ConfigError(
                f"model: a {tensor.dtype.name} gradient or state cannot go over NCCL "
                "(it carries float16, float32, float64, int32, int64); make the "
                "variable one of those, or set gpus_per_worker: 0")
        chained = self._hint == "nccl" and self._previous is not None
        key = self._key if key_offset is None else self._key + key_offset
        with self._placed(), \
                tf.control_dependencies([self._previous] if chained else []):
            out = op(input=tensor, group_size=self._spec.group_size,
                     group_key=self._spec.group_key, instance_key=key,
                     ordering_token=[], communication_hint=self._hint,
                     timeout_seconds=0.0, **attrs)
        self._key += keys
        self._previous = out
        return out

    def reduce(self, tensor: tf.Tensor) -> tf.Tensor:
        """The group's mean of ``tensor`` (a flat bucket, the same shape on
        every rank): all-reduced, or gathered and summed (see
        :meth:`GroupSpec.mean_by_gather`).

        NCCL has no bfloat16: a bfloat16 bucket is reduced in float32 (its
        values exactly, the mean rounded once to bfloat16), twice the bytes."""
        if self._hint == "nccl" and tensor.dtype.base_dtype == tf.bfloat16:
            with self._placed():
                mean = self.reduce(tf.cast(tensor, tf.float32))
                return tf.cast(mean, tf.bfloat16)
        if self._spec.mean_by_gather():
            size = self._spec.group_size
            gathered = self.gather(tensor)
            return tf.reduce_sum(tf.reshape(gathered, [size, -1]), axis=0) / size
        return self._launch(tf.raw_ops.CollectiveReduceV2, tensor, merge_op="Add",
                            final_op="Div")

    def gather(self, tensor: tf.Tensor, key_offset: Any = None, keys: int = 1) -> tf.Tensor:
        """Every rank's ``tensor`` (same shape on every rank), concatenated
        along axis 0 in rank order. A tensor whose shape changes between steps
        reserves ``keys`` instance keys and runs on the ``key_offset``-th (an
        int32 tensor, the same on every rank), one per shape it can take.

        ``CollectiveGatherV2`` takes no bfloat16 (nor does NCCL); a gather
        only moves bits, so a bfloat16 tensor travels bitcast to float16."""
        if tensor.dtype.base_dtype == tf.bfloat16:
            with self._placed():
                out = self.gather(tf.bitcast(tensor, tf.float16), key_offset, keys)
                return tf.bitcast(out, tf.bfloat16)
        return self._launch(tf.raw_ops.CollectiveGatherV2, tensor, key_offset, keys)


def _reduce_dense(pairs: Sequence[tuple[Any, Any]], launch: _Launcher,
                  bucket_bytes: int) -> list[tf.Tensor]:
    """Averages ``(gradient, variable)`` pairs densely, one reduction per bucket."""
    dense = [_dense(g) for g, _ in pairs]
    shapes = [_static_shape(t, v) for t, (_, v) in zip(dense, pairs)]
    for shape, (_, var) in zip(shapes, pairs):
        if not shape.is_fully_defined():
            raise ConfigError(f"model: the gradient of {var!r} has no static shape "
                              f"({shape}); all-reduce buckets need known sizes")
    items = [(t.dtype.name, s.num_elements() * t.dtype.size) for t, s in zip(dense, shapes)]
    out: list[Any] = [None] * len(dense)
    for bucket in plan_buckets(items, bucket_bytes):
        flat = tf.concat([tf.reshape(dense[i], [-1]) for i in bucket.indices], axis=0)
        parts = tf.split(launch.reduce(flat),
                         [shapes[i].num_elements() for i in bucket.indices], axis=0)
        for i, part in zip(bucket.indices, parts):
            out[i] = tf.reshape(part, shapes[i])
    return out


def allreduce_gradients(grads_and_vars: Sequence[tuple[Any, Any]],
                        spec: GroupSpec,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                        instance_key_start: int = DEFAULT_INSTANCE_KEY_START,
                        sparse_density_threshold: float = sparse.DEFAULT_DENSITY_THRESHOLD,
                        batch_size: int | None = None) -> list[tuple[Any, Any]]:
    """Averages gradients across the group, bucketed, in the default graph.

    Dense gradients (and model state) get one ``CollectiveReduceV2`` (``Add``
    then ``Div`` by group size) per bucket of :func:`plan_buckets`.

    ``tf.IndexedSlices`` gradients (embedding lookups) stay sparse where that
    sends fewer bytes: every rank's rows and indices are all-gathered
    (``CollectiveGatherV2``, see :mod:`distributed.train.sparse`), the values
    divided by the group size, and the optimizer applies the result sparsely.
    One whose gathered slices would exceed ``sparse_density_threshold`` times
    its dense bytes is made dense and joins the buckets instead (exact, but the
    whole tensor goes over the wire each step). The choice is made here, from
    static shapes, so every rank makes it alike; an unknown row count is
    estimated from ``batch_size`` (:func:`sparse.estimate_rows`).

    ``None`` gradients pass through untouched. With one worker no collective is
    built and the pairs come back as they are (IndexedSlices included).

    Instance keys are ``instance_key_start, instance_key_start + 1, ...`` in
    launch order: the gather of the sparse gradients' row counts (only where a
    count is not static; it needs only the indices, so it goes first), the
    dense buckets, then the sparse gathers (one of rows whose count is not
    static reserves :data:`sparse.SIZE_CLASSES` keys, one per padded size).
    Keys are reused on every ``Session.run`` (TF's step id tells steps apart),
    but two collectives in one graph, or in two graphs of one process with
    different shapes, must not share a key: give another call a disjoint
    ``instance_key_start``.

    The ops carry no ``timeout_seconds`` on purpose: on TF 2.21 a nonzero
    value makes every launch park two threads that sleep for the whole
    timeout (``SchedClosureAfter``), so at hundreds of collectives a second
    a process holds tens of thousands of threads and aborts when thread
    creation fails. Bound steps with :func:`run_options` instead.

    With NCCL each collective (gathers included) waits on the previous one's
    output, so every GPU launches them in the same order (NCCL deadlocks
    otherwise); the ring transport matches peers by instance key and needs no
    ordering.

    Args:
        grads_and_vars: ``(gradient or None, variable)`` pairs; the variable is
            passed through and used for its static shape.
        spec: This worker's group.
        bucket_bytes: Upper bound on a bucket's bytes.
        instance_key_start: First instance key this call uses.
        sparse_density_threshold: Gather an ``IndexedSlices`` when its gathered
            bytes are at most this times its dense bytes; 0 never gathers.
        batch_size: Examples per worker per step, for estimating the rows of
            an ``IndexedSlices`` whose row count is not static.

    Returns:
        ``(averaged gradient or None, variable)`` pairs in the input order.
    """
    pairs = list(grads_and_vars)
    if spec.group_size == 1:
        return pairs
    out: list[Any] = [g for g, _ in pairs]
    gathered = [p for p, (g, v) in enumerate(pairs) if isinstance(g, tf.IndexedSlices)
                and sparse.should_gather(g, v, spec.group_size, sparse_density_threshold,
                                         batch_size)]
    reduced = [p for p, (g, _) in enumerate(pairs) if g is not None and p not in gathered]
    slices = [pairs[p][0] for p in gathered]
    launch = _Launcher(spec, instance_key_start)
    with tf.name_scope("allreduce"), tf.device(spec.task_device):
        counts = sparse.gather_row_counts(slices, launch.gather, spec.group_size)
        dense = _reduce_dense([pairs[p] for p in reduced], launch, bucket_bytes)
        gathered_slices = sparse.gather_slices(slices, counts, launch.gather,
                                               spec.group_size, bucket_bytes,
                                               plan_buckets, batch_size)
    for p, grad in zip(reduced + gathered, dense + gathered_slices):
        out[p] = grad
    return [(g, v) for g, (_, v) in zip(out, pairs)]
