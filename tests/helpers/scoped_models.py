"""Test models: the same linear model under two different variable scopes."""

import tensorflow as tf

from distributed.model import PREDICT, ModelSpec


def _linear(features, labels, mode, scope):
    with tf.compat.v1.variable_scope(scope, reuse=tf.compat.v1.AUTO_REUSE):
        w = tf.compat.v1.get_variable("dense/kernel", [64, 10])
        b = tf.compat.v1.get_variable("dense/bias", [10],
                                      initializer=tf.compat.v1.zeros_initializer())
    logits = tf.matmul(features["image"], w) + b
    if mode == PREDICT:
        return ModelSpec(predictions={"logits": logits})
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))
    return ModelSpec(loss=loss, predictions={"logits": logits})


def tower_model_fn(features, labels, mode, params):
    return _linear(features, labels, mode, "tower")


def serving_model_fn(features, labels, mode, params):
    return _linear(features, labels, mode, "serving/tower")


def ref_variables_model_fn(features, labels, mode, params):
    """A TF1-style model on reference variables (``use_resource=False``),
    which optimizers update in place rather than copy-on-write."""
    with tf.compat.v1.variable_scope("ref"):
        hidden = tf.compat.v1.get_variable("hidden/kernel", [64, 32], use_resource=False)
        logits_w = tf.compat.v1.get_variable("logits/kernel", [32, 10], use_resource=False)
        bias = tf.compat.v1.get_variable("logits/bias", [10], use_resource=False,
                                         initializer=tf.compat.v1.zeros_initializer())
    logits = tf.matmul(tf.nn.relu(tf.matmul(features["image"], hidden)), logits_w) + bias
    if mode == PREDICT:
        return ModelSpec(predictions={"logits": logits})
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))
    return ModelSpec(loss=loss, predictions={"logits": logits})
