"""Test models with a partitioned embedding table (issue 11).

The digits image becomes 64 ids (pixel index x 17 + intensity 0..16), looked
up in ``emb`` [1088, 8] with ``tf.nn.embedding_lookup`` (TF2's, partition
strategy ``div``: the parts are contiguous row blocks, the layout
``fixed_size_partitioner`` makes and the checkpoint's slices describe), summed,
then a dense head. ``model_params["parts"]`` partitions the table (0: not);
the ``*_parts_model_fn`` variants force a layout whatever the params say, for
a restore job that partitions it otherwise than training did.
"""

import numpy as np
import tensorflow as tf

from distributed.model import PREDICT, ModelSpec

VOCAB, DIM, PIXELS, LEVELS = 64 * 17, 8, 64, 17


def ids_of(image):
    """The ids of a batch of digits images (numpy or tensor)."""
    if isinstance(image, np.ndarray):
        return np.arange(PIXELS) * LEVELS + np.rint(image * 16).astype(np.int64)
    return (tf.range(PIXELS, dtype=tf.int64) * LEVELS
            + tf.cast(tf.round(image * 16), tf.int64))


def _model(features, labels, mode, parts):
    partitioner = tf.compat.v1.fixed_size_partitioner(parts) if parts else None
    emb = tf.compat.v1.get_variable(
        "emb", [VOCAB, DIM], partitioner=partitioner,
        initializer=tf.compat.v1.random_normal_initializer(stddev=0.1, seed=1))
    kernel = tf.compat.v1.get_variable("head/kernel", [DIM, 10])
    bias = tf.compat.v1.get_variable("head/bias", [10],
                                     initializer=tf.compat.v1.zeros_initializer())
    hidden = tf.reduce_sum(tf.nn.embedding_lookup(emb, ids_of(features["image"])), 1)
    logits = tf.matmul(hidden, kernel) + bias
    if mode == PREDICT:
        return ModelSpec(predictions={"logits": logits})
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))
    return ModelSpec(loss=loss, predictions={"logits": logits})


def emb_model_fn(features, labels, mode, params):
    return _model(features, labels, mode, int(params.get("parts", 4)))


def three_parts_model_fn(features, labels, mode, params):
    return _model(features, labels, mode, 3)


def unpartitioned_model_fn(features, labels, mode, params):
    return _model(features, labels, mode, 0)


def reference_logits(emb, kernel, bias, image):
    """The model's logits in numpy, from the logical table's values."""
    return emb[ids_of(image)].sum(1) @ kernel + bias


def big_table_model_fn(features, labels, mode, params):
    """An unpartitioned 280,000 x 64 float32 table (68 MiB): too large for the
    writer to balance over several shards."""
    emb = tf.compat.v1.get_variable("big", [280_000, 64])
    hidden = tf.reduce_sum(tf.nn.embedding_lookup(emb, ids_of(features["image"])), 1)
    logits = tf.matmul(hidden, tf.compat.v1.get_variable("head/kernel", [64, 10]))
    if mode == PREDICT:
        return ModelSpec(predictions={"logits": logits})
    return ModelSpec(loss=tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits)), predictions={"logits": logits})
