"""The acceptance model of exactly-once input (tests/test_input_position.py).

2,048 ids; each worker reads its shard (ids ≡ rank mod workers) shuffled,
epoch after epoch. The model counts per id how often a step trained on it
(``state/seen``, non-trainable, written in ``UPDATE_OPS``, summed across
workers) and fits one weight per id, so two runs trained on the same
examples end with the same counts and weights, and any batch trained twice
or skipped shows in the counts.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from distributed.model import PREDICT, TRAIN, ModelSpec

NUM_IDS = 2048


def dataset_input_fn(worker_index: int, num_workers: int, batch_size: int,
                     params: Mapping[str, Any]):
    """A tf.data shard, shuffled with a buffer (``params["buffer"]``, default
    256; 0: none) reshuffled each epoch, repeated, batched."""
    ds = tf.data.Dataset.range(NUM_IDS).shard(num_workers, worker_index)
    buffer = int(params.get("buffer", 256))
    if buffer:
        ds = ds.shuffle(buffer, seed=17 + worker_index)
    ds = ds.repeat().batch(batch_size, drop_remainder=True)
    return ds.map(lambda ids: ({"id": ids}, ids % 3))


def generator_dataset_input_fn(worker_index: int, num_workers: int, batch_size: int,
                               params: Mapping[str, Any]):
    """The generator's batches through ``from_generator``: Python state."""
    return tf.data.Dataset.from_generator(
        lambda: generator_input_fn(worker_index, num_workers, batch_size, params),
        output_signature=({"id": tf.TensorSpec([batch_size], tf.int64)},
                          tf.TensorSpec([batch_size], tf.int64)))


def _epoch_batches(worker_index: int, num_workers: int, batch_size: int, epoch: int):
    ids = np.arange(worker_index, NUM_IDS, num_workers, dtype=np.int64)
    ids = np.random.default_rng([worker_index, epoch]).permutation(ids)
    return [ids[i:i + batch_size] for i in range(0, len(ids) - batch_size + 1, batch_size)]


def generator_input_fn(worker_index: int, num_workers: int, batch_size: int,
                       params: Mapping[str, Any]) -> Iterator[tuple[dict, np.ndarray]]:
    """A plain generator: the shard in a new seeded order each epoch."""
    epoch = 0
    while True:
        for ids in _epoch_batches(worker_index, num_workers, batch_size, epoch):
            yield {"id": ids}, ids % 3
        epoch += 1


def resumable_input_fn(worker_index: int, num_workers: int, batch_size: int,
                       params: Mapping[str, Any], start_batch: int = 0):
    """The same batches as :func:`generator_input_fn`, from batch
    ``start_batch`` on without reading those before it."""
    per_epoch = len(_epoch_batches(worker_index, num_workers, batch_size, 0))
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        for ids in _epoch_batches(worker_index, num_workers, batch_size, epoch)[skip:]:
            yield {"id": ids}, ids % 3
        epoch, skip = epoch + 1, 0


def seen_model_fn(features, labels, mode, params):
    """One weight per id (``params["ids"]`` of them, default 2,048); in train
    mode ``state/seen`` counts each id trained on (summed over the workers),
    so any batch trained twice or skipped shows."""
    size = int(params.get("ids", NUM_IDS))
    ids = tf.reshape(features["id"], [-1])
    w = tf.compat.v1.get_variable("w", [size], initializer=tf.zeros_initializer())
    logits = tf.gather(w, ids)
    if mode == PREDICT:
        return ModelSpec(predictions={"logits": logits})
    loss = tf.reduce_mean(tf.square(logits - tf.cast(labels, tf.float32)))
    if mode == TRAIN:
        seen = tf.compat.v1.get_variable(
            "state/seen", [size], trainable=False, initializer=tf.zeros_initializer(),
            aggregation=tf.VariableAggregation.SUM)
        tf.compat.v1.add_to_collection(
            tf.compat.v1.GraphKeys.UPDATE_OPS,
            tf.compat.v1.scatter_add(seen, ids, tf.ones_like(ids, tf.float32)))
    return ModelSpec(loss=loss, predictions={"logits": logits})


def assert_same_training(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    """Two runs' final ``state/seen`` and ``w`` (each a dict of the two):
    the same per-id counts exactly, the same weights within 1e-4."""
    np.testing.assert_array_equal(a["state/seen"], b["state/seen"])
    np.testing.assert_allclose(a["w"], b["w"], atol=1e-4)
