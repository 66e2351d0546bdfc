"""Test model and input for replicated model state (tests/test_model_state.py).

Worker ``k`` of 2 sees only ids ``≡ k mod 2``. The model keeps non-trainable
counters of the ids it saw, written by different ops and declared with
different aggregations, plus one trainable weight so that it trains.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from distributed.model import PREDICT, TRAIN, ModelSpec

NUM_IDS = 16
SUM = tf.VariableAggregation.SUM
MEAN = tf.VariableAggregation.MEAN
FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA

# name -> (dtype, shape, aggregation): the counters model_fn keeps.
COUNTERS = {
    "scatter_add_sum": (tf.float32, [NUM_IDS], SUM),       # ResourceScatterAdd
    "assign_add_sum": (tf.int64, [], SUM),                 # AssignAddVariableOp
    "scatter_nd_add_sum": (tf.int32, [NUM_IDS], SUM),      # ResourceScatterNdAdd
    "assign_sum": (tf.float32, [], SUM),                   # AssignVariableOp
    "cond_assign_add_sum": (tf.float32, [], SUM),          # a write inside tf.cond
    "scatter_add_first": (tf.float32, [NUM_IDS], FIRST),
    "scatter_update_first": (tf.bool, [NUM_IDS], FIRST),   # ResourceScatterUpdate
    "scatter_add_mean": (tf.float32, [NUM_IDS], MEAN),
    "scatter_add_none": (tf.float32, [NUM_IDS], None),     # declared nothing
}
REF_COUNTER = "ref_scatter_add_sum"  # ScatterAdd on a reference variable


def ids_input_fn(worker_index: int, num_workers: int, batch_size: int,
                 params: Mapping[str, Any]) -> Iterator[tuple[dict, np.ndarray]]:
    """Batches of ``{"id": int64 [B]}`` with ids ``≡ worker_index mod
    num_workers`` in ``[0, NUM_IDS)``, from a stream seeded by the worker."""
    rng = np.random.default_rng([int(params.get("seed", 0)), worker_index])
    while True:
        ids = worker_index + num_workers * rng.integers(
            0, NUM_IDS // num_workers, batch_size)
        yield {"id": ids.astype(np.int64)}, (ids % 3).astype(np.int64)


def _one_weight(features, labels, mode):
    """The ids and the spec both models share: one trainable weight per id."""
    ids = tf.reshape(features["id"], [-1])
    w = tf.compat.v1.get_variable("w", [NUM_IDS], initializer=tf.zeros_initializer())
    logits = tf.gather(w, ids)
    if mode == PREDICT:
        return ids, ModelSpec(predictions={"logits": logits})
    loss = tf.reduce_mean(tf.square(logits - tf.cast(labels, tf.float32)))
    return ids, ModelSpec(loss=loss, predictions={"logits": logits})


def counter_model_fn(features, labels, mode, params):
    """One trainable weight; in train mode, every counter of :data:`COUNTERS`
    (and :data:`REF_COUNTER` with ``params["ref"]``) written in
    ``UPDATE_OPS``. ``params["bad"]``: ``"string"`` or ``"bool"`` (declared
    ``SUM``), a variable of that dtype written too (a configuration error)."""
    ids, spec = _one_weight(features, labels, mode)
    if mode == TRAIN:
        for op in _count(ids, params):
            tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.UPDATE_OPS, op)
    return spec


def _counter(name: str, dtype, shape, aggregation, **kwargs):
    kwargs.setdefault("initializer", tf.zeros_initializer())
    if aggregation is not None:
        kwargs["aggregation"] = aggregation
    return tf.compat.v1.get_variable(f"state/{name}", shape, dtype, trainable=False,
                                     **kwargs)


def _count(ids, params) -> list:
    """The writes of one batch of ``ids`` to every counter."""
    v = {name: _counter(name, *spec) for name, spec in COUNTERS.items()}
    batch = tf.size(ids)
    ones = tf.ones_like(ids, tf.float32)
    ops = [
        tf.compat.v1.scatter_add(v["scatter_add_sum"], ids, ones),
        v["assign_add_sum"].assign_add(tf.cast(batch, tf.int64)),
        tf.compat.v1.scatter_nd_add(v["scatter_nd_add_sum"], ids[:, None],
                                    tf.ones_like(ids, tf.int32)),
        v["assign_sum"].assign(v["assign_sum"] + tf.cast(batch, tf.float32)),
        tf.cond(batch > 0,
                lambda: v["cond_assign_add_sum"].assign_add(tf.cast(batch, tf.float32)),
                lambda: v["cond_assign_add_sum"].read_value()).op,
        tf.compat.v1.scatter_add(v["scatter_add_first"], ids, ones),
        tf.compat.v1.scatter_update(v["scatter_update_first"], ids,
                                    tf.ones_like(ids, tf.bool)),
        tf.compat.v1.scatter_add(v["scatter_add_mean"], ids, ones),
        tf.compat.v1.scatter_add(v["scatter_add_none"], ids, ones),
    ]
    if params.get("ref"):
        ref = _counter(REF_COUNTER, tf.float32, [NUM_IDS], SUM, use_resource=False)
        ops.append(tf.compat.v1.scatter_add(ref, ids, ones))
    if params.get("bad") == "string":
        bad = _counter("bad", tf.string, None, None, initializer=tf.constant(""))
        ops.append(bad.assign(tf.strings.as_string(batch)))
    elif params.get("bad") == "bool":
        bad = _counter("bad", tf.bool, [], SUM)
        ops.append(bad.assign(batch > 0))
    return ops


def table_model_fn(features, labels, mode, params):
    """One trainable weight and a ``params["table"]``-row float32 frequency
    table written by ``scatter_add``, declared ``params["aggregation"]``
    (``"SUM"``, ``"MEAN"``, ``"ONLY_FIRST_REPLICA"``, ``"NONE"``; ``"local"``:
    a local variable, never exchanged): what model state costs per step."""
    ids, spec = _one_weight(features, labels, mode)
    if mode == TRAIN:
        kind = params.get("aggregation", "SUM")
        extra = ({"collections": [tf.compat.v1.GraphKeys.LOCAL_VARIABLES]}
                 if kind == "local" else
                 {"aggregation": getattr(tf.VariableAggregation, kind)})
        table = tf.compat.v1.get_variable(
            "state/table", [int(params["table"])], trainable=False,
            initializer=tf.zeros_initializer(), **extra)
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.UPDATE_OPS,
                                       tf.compat.v1.scatter_add(table, ids, tf.ones_like(
                                           ids, tf.float32)))
    return spec
