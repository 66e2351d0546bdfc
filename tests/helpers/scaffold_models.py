"""Estimator model functions that need Scaffold semantics: lookup tables of
vocabulary feature columns, a scaffold's init_fn and local_init_op."""

import numpy as np
import tensorflow as tf

from distributed.model.estimator import EstimatorSpec, ModeKeys, from_estimator

COLORS = ["red", "green", "blue"]
UNSEEN = "purple"  # never in the vocabulary: one of the OOV buckets


def _columns(params):
    fc = tf.compat.v1.feature_column
    if params.get("vocabulary_file"):
        color = fc.categorical_column_with_vocabulary_file(
            "color", params["vocabulary_file"], num_oov_buckets=2,
            vocabulary_size=params.get("vocabulary_size"))
    else:
        color = fc.categorical_column_with_vocabulary_list("color", COLORS,
                                                           num_oov_buckets=2)
    return [fc.embedding_column(color, 4), fc.numeric_column("x")]


def _estimator_model_fn(features, labels, mode, params):
    net = tf.compat.v1.feature_column.input_layer(features, _columns(params))
    logits = tf.compat.v1.layers.dense(net, 2, name="logits")
    predictions = {"class": tf.argmax(logits, 1), "logits": logits}
    scaffold = None
    if params.get("scaffold"):
        # A warm start the way Estimator users write one, and a local
        # variable only the scaffold's local_init_op sets.
        marker = tf.compat.v1.get_variable(
            "marker", [], collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES],
            initializer=tf.compat.v1.zeros_initializer())
        bias = [v for v in tf.compat.v1.global_variables()
                if v.op.name == "logits/bias"][0]
        warm = tf.compat.v1.assign(bias, [3.0, -3.0])
        scaffold = tf.compat.v1.train.Scaffold(
            init_fn=lambda scaffold, session: session.run(warm),
            local_init_op=tf.group(tf.compat.v1.assign(marker, 7.0),
                                   tf.compat.v1.tables_initializer()))
        predictions["marker"] = tf.identity(marker)
    if mode == ModeKeys.PREDICT:
        return EstimatorSpec(mode, predictions=predictions, scaffold=scaffold)
    loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, logits)
    metrics = {"accuracy": tf.compat.v1.metrics.accuracy(labels, predictions["class"])}
    return EstimatorSpec(mode, predictions=predictions, loss=loss,
                         eval_metric_ops=metrics, scaffold=scaffold)


model_fn = from_estimator(_estimator_model_fn)


def colors_input_fn(worker_index, num_workers, batch_size, params):
    """Raw color strings (some never in the vocabulary) and a number."""
    rng = np.random.default_rng(worker_index + int(params.get("seed", 0)))
    names = np.array(COLORS + [UNSEEN], dtype=object)
    while True:
        c = rng.integers(0, 4, batch_size)
        x = rng.normal(size=(batch_size, 1)).astype(np.float32)
        yield {"color": names[c], "x": x}, ((c == 0) | (x[:, 0] > 1)).astype(np.int64)
