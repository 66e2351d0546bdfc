"""A tiny ResNet from tensorflow/models' ``official/r1/resnet/resnet_model.py``
(vendored unmodified in ``tf_models_resnet/``) on the 8x8 digits.

``resnet_model.Model`` is TF1 model-zoo code: ``tf.compat.v1.layers.conv2d``,
``batch_normalization`` (``fused=True``, its moving-average updates in
``UPDATE_OPS``), ``max_pooling2d`` and ``dense``, auto-named per graph
(``resnet_model/conv2d_3/kernel``, ``resnet_model/batch_normalization_2/
moving_mean``). It needs nothing from the framework but the legacy-Keras
routing: ``tf.compat.v1.layers`` exists on TensorFlow 2.16+ only with
``TF_USE_LEGACY_KERAS=1`` set before TensorFlow is imported.

:func:`model_fn` is the glue to the framework's contract
(:mod:`distributed.model`): name it in a config as
``tests.thirdparty.resnet_digits:model_fn``, with
``distributed.examples.digits:digits_input_fn`` as the input.
"""

from __future__ import annotations

from typing import Any, Mapping

import tensorflow as tf

from distributed.model import EVAL, PREDICT, TRAIN, ModelSpec, check_mode

NUM_CLASSES = 10
ARCHITECTURE = {
    "resnet_size": 8,  # only recorded by the model; the blocks below decide
    "bottleneck": False,
    "num_classes": NUM_CLASSES,
    "num_filters": 8,
    "kernel_size": 3,
    "conv_stride": 1,
    "first_pool_size": None,
    "first_pool_stride": None,
    "block_sizes": [1, 1],
    "block_strides": [1, 2],
    "resnet_version": 2,
    "data_format": "channels_last",
}
"""``resnet_model.Model``'s arguments for 8x8x1 digits (``model_params``
override them)."""


def resnet(params: Mapping[str, Any] | None = None):
    """The ``resnet_model.Model`` that :data:`ARCHITECTURE` and ``params`` describe."""
    from tests.thirdparty.tf_models_resnet import resnet_model
    return resnet_model.Model(**{**ARCHITECTURE, **dict(params or {})})


def images(features: Mapping[str, Any]) -> tf.Tensor:
    """The digits' flat ``[B, 64]`` pixels as ``[B, 8, 8, 1]`` images."""
    return tf.reshape(tf.cast(features["image"], tf.float32), [-1, 8, 8, 1])


def model_fn(features: Mapping[str, tf.Tensor], labels: Any, mode: str,
             params: Mapping[str, Any]) -> ModelSpec:
    """The framework's model function: ``resnet(params)(images, training)``,
    the mean cross-entropy, ``logits``/``probabilities``/``classes`` and eval
    ``accuracy``. Batch norm's updates are where the ResNet code puts them:
    ``UPDATE_OPS``."""
    check_mode(mode, labels)
    logits = resnet(params)(images(features), training=mode == TRAIN)
    predictions = {
        "logits": logits,
        "probabilities": tf.nn.softmax(logits, name="probabilities"),
        "classes": tf.argmax(logits, axis=-1, name="classes"),
    }
    if mode == PREDICT:
        return ModelSpec(predictions=predictions)
    labels = tf.cast(labels, tf.int64)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits), name="loss")
    eval_metrics = {}
    if mode == EVAL:
        eval_metrics["accuracy"] = tf.compat.v1.metrics.accuracy(
            labels, predictions["classes"])
    return ModelSpec(loss=loss, predictions=predictions, eval_metrics=eval_metrics)
