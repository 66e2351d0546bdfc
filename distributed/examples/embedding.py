"""An embedding model, whose table's gradient is sparse, and its synthetic input.

:func:`embedding_model_fn` looks ids up in a ``tf.compat.v1.get_variable``
table (``tf.nn.embedding_lookup``), averages each example's rows and
classifies them with a dense layer. The table's gradient is a
``tf.IndexedSlices`` of the rows looked up, which the workers exchange by
all-gather (see :mod:`distributed.train.sparse`) instead of all-reducing the
whole table. :func:`embedding_input_fn` draws the ids with numpy and labels
each example by a fixed random vote of its ids, so the loss can go down.

Both take ``vocab`` (table rows; default 1000) in their params; give the model
and the input the same value::

    model: distributed.examples.embedding:embedding_model_fn
    model_params: {vocab: 200000, dim: 64}
    input: distributed.examples.embedding:embedding_input_fn
    input_params: {vocab: 200000, lookups: 8}
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from distributed.model import EVAL, PREDICT, ModelSpec

IDS_KEY = "ids"
DEFAULTS = {"vocab": 1000, "dim": 16, "lookups": 8, "num_classes": 4, "seed": 0}


def _param(params: Mapping[str, Any] | None, name: str) -> int:
    return int((params or {}).get(name, DEFAULTS[name]))


def embedding_input_fn(worker_index: int, num_workers: int, batch_size: int,
                       params: Mapping[str, Any]) -> Iterator[tuple[dict, np.ndarray]]:
    """Yields batches of ``({"ids": int64 [B, lookups]}, int64 [B])`` forever.

    Ids are uniform in ``[0, vocab)``, drawn from a stream seeded by
    ``params["seed"]`` and the worker index (so workers see different ids and
    runs repeat). Each id votes for a class fixed by ``seed`` alone, the same
    on every worker; an example's label is its ids' majority vote.

    Args:
        worker_index: This worker's index, in ``[0, num_workers)``.
        num_workers: Number of data-parallel workers.
        batch_size: Examples per batch.
        params: ``vocab``, ``lookups`` (ids per example), ``num_classes``, ``seed``.
    """
    vocab, lookups = _param(params, "vocab"), _param(params, "lookups")
    num_classes, seed = _param(params, "num_classes"), _param(params, "seed")
    votes = np.random.default_rng(seed).integers(0, num_classes, vocab)
    rng = np.random.default_rng([seed, worker_index, num_workers])
    while True:
        ids = rng.integers(0, vocab, (batch_size, lookups), dtype=np.int64)
        counts = np.stack([(votes[ids] == c).sum(axis=1) for c in range(num_classes)],
                          axis=1)
        yield {IDS_KEY: ids}, counts.argmax(axis=1).astype(np.int64)


def embedding_model_fn(features: Mapping[str, tf.Tensor], labels: Any, mode: str,
                       params: Mapping[str, Any]) -> ModelSpec:
    """Ids -> ``embedding/table`` -> mean of the rows -> ``embedding/logits``.

    Variables: ``embedding/table`` ``[vocab, dim]`` and
    ``embedding/logits/{kernel,bias}``, all trainable.

    Args:
        features: ``{"ids": int [B, L]}``, each id in ``[0, vocab)``.
        labels: Class ids ``[B]``; ``None`` in predict mode.
        mode: One of :data:`distributed.model.MODES`.
        params: ``vocab``, ``dim``, ``num_classes``, ``seed``.
    """
    vocab, dim = _param(params, "vocab"), _param(params, "dim")
    num_classes, seed = _param(params, "num_classes"), _param(params, "seed")
    with tf.compat.v1.variable_scope("embedding", reuse=tf.compat.v1.AUTO_REUSE):
        table = tf.compat.v1.get_variable(
            "table", [vocab, dim],
            initializer=tf.compat.v1.random_uniform_initializer(-0.05, 0.05, seed=seed))
        kernel = tf.compat.v1.get_variable(
            "logits/kernel", [dim, num_classes],
            initializer=tf.compat.v1.glorot_uniform_initializer(seed=seed + 1))
        bias = tf.compat.v1.get_variable("logits/bias", [num_classes],
                                         initializer=tf.compat.v1.zeros_initializer())
    rows = tf.nn.embedding_lookup(table, features[IDS_KEY])
    logits = tf.nn.bias_add(tf.matmul(tf.reduce_mean(rows, axis=1), kernel), bias)
    predictions = {"logits": logits, "classes": tf.argmax(logits, axis=-1)}
    if mode == PREDICT:
        return ModelSpec(predictions=predictions)
    labels = tf.cast(labels, tf.int64)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))
    metrics = ({"accuracy": tf.compat.v1.metrics.accuracy(labels, predictions["classes"])}
               if mode == EVAL else {})
    return ModelSpec(loss=loss, predictions=predictions, eval_metrics=metrics)
