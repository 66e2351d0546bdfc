"""Sparse gradients (``tf.IndexedSlices``) exchanged by all-gather, not densified.

An embedding lookup's gradient is an ``IndexedSlices``: the rows this worker
looked up (``values``) and which rows they are (``indices``). All-reducing it
densely sends the whole table every step; gathering every worker's rows sends
only what was touched (a 200,000 x 64 float32 table read by 512 ids a worker
on each of 2: 51 MB densely, 270 KB gathered). This is what
``MultiWorkerMirroredStrategy`` does
(``CollectiveReplicaLauncher.all_reduce_indexed_slices``), with changes that
save launches:

* The indices ride in the values' gather: cast to int64 and bitcast into
  ``8 / itemsize`` extra columns of the values' dtype, bitcast back after.
  Bitcasts and the gather only copy bits, so the indices come back exact
  (:data:`PACKABLE` lists the dtypes this works for; others go dense).
* Where the number of rows is static, no lengths are exchanged and nothing is
  padded: every worker builds the same graph, so every rank sends as many.
  Where it is not (a ``None`` batch dimension, as this framework's input
  placeholders have), one gather of every such gradient's row count (int64,
  which needs only the indices, so it can run as soon as the step starts)
  precedes the data; each rank pads to the longest rank's rows (and the
  buffer to a power of two, see :func:`_padded_gather`) and the padding is
  masked out after the gather.
* Gradients of one dtype share a gather, in buckets of at most ``bucket_bytes``
  (see :func:`distributed.train.buckets.plan_buckets`).

Values are divided by the group size before the gather, so the gathered slices
sum, duplicate indices included, to the group's mean gradient; the optimizer
applies them sparsely (``tf.compat.v1`` optimizers sum duplicate indices in
``_apply_sparse_duplicate_indices``), as it does on one worker.

Whether a gradient is gathered or reduced densely is decided when the graph is
built, from static shapes only (:func:`should_gather`), so every worker decides
alike and launches the same collectives.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import tensorflow as tf

DEFAULT_DENSITY_THRESHOLD = 0.5
INDEX_BYTES = 8  # indices travel as int64, whatever their own dtype
PACKABLE = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
# Instance keys a padded gather reserves, one per power-of-two size: enough
# for 2**31 elements a rank (padded gathers of more fail the step).
SIZE_CLASSES = 32
# Ops an IndexedSlices' indices pass through unchanged in number of elements,
# on the way back to the ids tensor whose static shape tells their count.
_SAME_SIZE_OPS = frozenset({"Reshape", "Identity", "Cast", "StopGradient"})

# gather(tensor) or gather(tensor, key_offset, keys): builds one all-gather
# on the next instance key, or on key ``first + key_offset`` of ``keys``
# reserved keys (a tensor whose shape changes between steps).
Gather = Callable[..., tf.Tensor]
PlanFn = Callable[[Sequence[tuple[str, int]], int], list]


def gathered_bytes(rows: int, row_bytes: int, group_size: int) -> int:
    """Bytes every worker ends up holding after gathering ``rows`` rows a rank."""
    return group_size * rows * (row_bytes + INDEX_BYTES)


def use_gather(rows: int | None, row_bytes: int, dense_bytes: int | None,
               group_size: int, threshold: float) -> bool:
    """The density rule; pure, so it tests without TensorFlow.

    Gather when the gathered slices are at most ``threshold`` times the dense
    tensor's bytes. ``threshold <= 0`` never gathers. Unknown ``rows`` (no
    static count and no estimate) or ``dense_bytes`` gather: an embedding's
    gradient has a row per id looked up, normally a small part of the table.
    """
    if threshold <= 0:
        return False
    if rows is None or dense_bytes is None:
        return True
    return gathered_bytes(rows, row_bytes, group_size) <= threshold * dense_bytes


def estimate_rows(indices: tf.Tensor, batch_size: int | None) -> int | None:
    """Rows of an ``IndexedSlices`` per worker, from static shapes only.

    The indices' own static length when known; else the element count of the
    ids they were reshaped or cast from (a gather's gradient reshapes its ids
    to one dimension), with one unknown dimension taken as ``batch_size``
    (this framework's inputs have a ``None`` batch dimension and are fed
    ``batch_size`` examples), summed over a concat (a table read twice).
    ``None`` where that does not determine it.
    """
    tensor = indices
    while not tensor.shape.is_fully_defined() and tensor.op.type in _SAME_SIZE_OPS:
        tensor = tensor.op.inputs[0]
    if tensor.shape.rank is None:
        return None
    if tensor.op.type == "ConcatV2" and tensor.shape.rank == 1:
        parts = [estimate_rows(t, batch_size) for t in tensor.op.inputs[:-1]]
        return None if None in parts else sum(parts)
    dims = tensor.shape.as_list()
    known = math.prod(d for d in dims if d is not None)
    if None not in dims:
        return known
    if dims.count(None) == 1 and batch_size:
        return batch_size * known
    return None


def should_gather(grad: tf.IndexedSlices, var: Any, group_size: int, threshold: float,
                  batch_size: int | None = None) -> bool:
    """Whether ``grad`` (of ``var``) is all-gathered (True) or reduced densely.

    Decided from static shapes (the same on every worker): the rows per
    worker (static, else :func:`estimate_rows`), the row size, and the dense
    size (``var``'s shape), by :func:`use_gather`. Values of a dtype that
    cannot carry int64 indices exactly (not in :data:`PACKABLE`) and rows of
    unknown size go dense.
    """
    values = grad.values
    row_shape = values.shape[1:]
    if values.dtype.base_dtype not in PACKABLE or not row_shape.is_fully_defined():
        return False
    row_bytes = row_shape.num_elements() * values.dtype.size
    var_shape = tf.TensorShape(getattr(var, "shape", None))
    dense_bytes = (var_shape.num_elements() * values.dtype.size
                   if var_shape.is_fully_defined() else None)
    rows = values.shape[0] if values.shape[0] is not None else estimate_rows(
        grad.indices, batch_size)
    return use_gather(rows, row_bytes, dense_bytes, group_size, threshold)


def gather_row_counts(slices: Sequence[tf.IndexedSlices], gather: Gather,
                      group_size: int) -> tf.Tensor | None:
    """Every rank's row count of each gradient whose count is not static.

    Returns ``[group_size, m]`` int64 for the ``m`` such gradients, in input
    order (``None`` where there are none, and no collective is built). Reads
    only the indices, so it need not wait for backprop.
    """
    counts = [tf.size(s.indices, out_type=tf.int64) for s in slices
              if s.values.shape[0] is None]
    if not counts:
        return None
    return tf.reshape(gather(tf.stack(counts)), [group_size, len(counts)])


def gather_slices(slices: Sequence[tf.IndexedSlices], counts: tf.Tensor | None,
                  gather: Gather, group_size: int, bucket_bytes: int,
                  plan: PlanFn, batch_size: int | None = None) -> list[tf.IndexedSlices]:
    """All-gathers ``slices`` (averaged): one collective per bucket.

    Args:
        slices: The gradients to gather, each of a :data:`PACKABLE` dtype.
        counts: :func:`gather_row_counts` of ``slices``.
        gather: Builds one all-gather (the group's next instance key).
        group_size: Workers in the group.
        bucket_bytes: Upper bound on a bucket's bytes (one rank's share;
            estimated where the row count is not static).
        plan: The bucket planner, ``(dtype name, bytes)`` items -> buckets.
        batch_size: For byte estimates of unknown row counts.

    Returns:
        Per input, an ``IndexedSlices`` of every rank's rows (rank-major), the
        values divided by ``group_size``, the input's ``dense_shape``.
    """
    packed = [_pack(s, group_size) for s in slices]
    dynamic = [i for i, s in enumerate(slices) if s.values.shape[0] is None]
    items = []
    for i, (s, p) in enumerate(zip(slices, packed)):
        rows = p.shape[0] if i not in dynamic else estimate_rows(s.indices, batch_size)
        tag = "?" if i in dynamic else ""  # static and padded ones never share a gather
        items.append((p.dtype.name + tag, (rows or 0) * p.shape[1] * p.dtype.size))
    out: list[Any] = [None] * len(slices)
    for bucket in plan(items, bucket_bytes):
        members = list(bucket.indices)
        member_counts = None
        if counts is not None and members[0] in dynamic:
            member_counts = [counts[:, dynamic.index(i)] for i in members]
        rows = _gather_rows([packed[i] for i in members], member_counts, gather, group_size)
        for i, block in zip(members, rows):
            out[i] = _unpack(block, slices[i])
    return out


def _pack(s: tf.IndexedSlices, group_size: int) -> tf.Tensor:
    """``[n, k + row]``: the int64 indices bitcast into ``k`` columns, then the
    values divided by ``group_size`` and flattened per row."""
    dtype = s.values.dtype.base_dtype
    width = s.values.shape[1:].num_elements()
    values = tf.reshape(s.values / tf.constant(group_size, dtype), [-1, width])
    index = tf.bitcast(tf.cast(s.indices, tf.int64), dtype)
    return tf.concat([tf.reshape(index, [-1, INDEX_BYTES // dtype.size]), values], axis=1)


def _unpack(rows: tf.Tensor, like: tf.IndexedSlices) -> tf.IndexedSlices:
    """The inverse of :func:`_pack` on gathered rows, shaped and typed as ``like``."""
    k = INDEX_BYTES // rows.dtype.size
    index = tf.reshape(tf.bitcast(rows[:, :k], tf.int64), [-1])
    values = tf.reshape(rows[:, k:], [-1] + like.values.shape[1:].as_list())
    return tf.IndexedSlices(values, tf.cast(index, like.indices.dtype), like.dense_shape)


def _gather_rows(blocks: Sequence[tf.Tensor], counts: Sequence[tf.Tensor] | None,
                 gather: Gather, group_size: int) -> list[tf.Tensor]:
    """Gathers 2-D row blocks of one dtype in one collective; returns each
    block's rows from every rank, rank-major. With ``counts`` (each block's
    rows per rank) the blocks are padded first (:func:`_padded_gather`)."""
    if counts is not None:
        return _padded_gather(blocks, counts, gather, group_size)
    sizes = [b.shape[0] * b.shape[1] for b in blocks]
    flat = tf.concat([tf.reshape(b, [-1]) for b in blocks], axis=0)
    everyone = tf.reshape(gather(flat), [group_size, -1])
    parts = tf.split(everyone, sizes, axis=1) if len(blocks) > 1 else [everyone]
    return [tf.reshape(p, [-1, b.shape[1]]) for p, b in zip(parts, blocks)]


def _padded_gather(blocks: Sequence[tf.Tensor], counts: Sequence[tf.Tensor],
                   gather: Gather, group_size: int) -> list[tf.Tensor]:
    """:func:`_gather_rows` for blocks whose row counts change from step to step.

    Each block is padded to its longest rank's rows, then the whole flat
    buffer to the next power of two of elements, and gathered under the
    instance key of that size class: TF's collective runtime fixes an
    instance's shape the first time it runs, so a key may never see another
    size (at most :data:`SIZE_CLASSES` keys; at most 2x the bytes). Every rank
    computes the same sizes from the gathered ``counts``. The padding is
    dropped after the gather.
    """
    longest = [tf.reduce_max(c) for c in counts]
    blocks = [tf.pad(b, [[0, m - tf.shape(b, out_type=tf.int64)[0]], [0, 0]])
              for b, m in zip(blocks, longest)]
    sizes = tf.stack([m * b.shape[1] for b, m in zip(blocks, longest)])
    total = tf.reduce_sum(sizes)
    powers = tf.constant([2**k for k in range(SIZE_CLASSES)], tf.int64)
    size_class = tf.reduce_sum(tf.cast(powers < total, tf.int32))  # ceil(log2(total))
    flat = tf.concat([tf.reshape(b, [-1]) for b in blocks], axis=0)
    flat = tf.pad(flat, [[0, tf.gather(powers, size_class) - total]])
    everyone = tf.reshape(gather(flat, size_class, SIZE_CLASSES), [group_size, -1])
    parts = tf.split(everyone[:, :total], sizes, axis=1, num=len(blocks))
    return [tf.boolean_mask(tf.reshape(p, [group_size, -1, b.shape[1]]),
                            tf.sequence_mask(c, m))
            for p, b, c, m in zip(parts, blocks, counts, longest)]
