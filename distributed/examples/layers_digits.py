"""The digits CNN written with ``tf.compat.v1.layers`` (TF1's own layers API).

Much public TF1 model code is written this way: ``tf.compat.v1.layers.conv2d``,
``batch_normalization(training=...)`` whose moving-statistics updates land in
``UPDATE_OPS``, ``dense``. In TensorFlow 2.16+ these layers exist only with Keras 2
routing (``TF_USE_LEGACY_KERAS=1``), which every process of the project gets from
:mod:`distributed.tfworld`; nothing here sets it. ``jobs/configs/digits_layers.yaml``
trains it with evaluation.
"""

from __future__ import annotations

from typing import Any, Mapping

import tensorflow as tf

from distributed.examples.digits import IMAGE_KEY, _head
from distributed.model import TRAIN, ModelSpec, check_mode


def layers_cnn_model_fn(features: Mapping[str, tf.Tensor], labels: Any, mode: str,
                        params: Mapping[str, Any]) -> ModelSpec:
    """Conv (no bias) -> batch norm -> ReLU -> max-pool, twice, then dense logits.

    Args:
        features: ``{"image": float [B, 64]}`` (8x8 digits, flattened).
        labels: Integer class ids ``[B]``; ``None`` in predict mode.
        mode: One of :data:`distributed.model.MODES`.
        params: ``"filters"`` (default ``[16, 32]``), ``"bn_momentum"``
            (default 0.9).
    """
    check_mode(mode, labels)
    params = params or {}
    layers = tf.compat.v1.layers
    x = tf.reshape(tf.cast(features[IMAGE_KEY], tf.float32), [-1, 8, 8, 1])
    with tf.compat.v1.variable_scope("layers_cnn", reuse=tf.compat.v1.AUTO_REUSE):
        for i, filters in enumerate(params.get("filters", [16, 32])):
            x = layers.conv2d(x, int(filters), 3, padding="same", use_bias=False,
                              name=f"conv_{i}")
            x = layers.batch_normalization(
                x, momentum=float(params.get("bn_momentum", 0.9)),
                training=mode == TRAIN, name=f"bn_{i}")
            x = layers.max_pooling2d(tf.nn.relu(x), 2, 2, padding="same")
        logits = layers.dense(layers.flatten(x), 10, name="logits")
    return _head(logits, labels, mode)
