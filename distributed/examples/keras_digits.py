"""A Keras 2 (``tf_keras``) convnet with batch norm, in the framework's graph.

:func:`keras_cnn_model_fn` follows the contract in :mod:`distributed.model`,
but builds its layers with ``tf_keras`` (the Keras 2 package) instead of
``get_variable`` and ``tf.nn`` ops. It trains on the digits inputs of
:mod:`distributed.examples.digits`; name it in a config as
``"distributed.examples.keras_digits:keras_cnn_model_fn"``.

Three things make a Keras model behave in a ``tf.compat.v1`` graph:

* **Batch-norm updates.** Keras layers in graph mode keep their moving-average
  updates in ``model.updates``, not in ``tf.compat.v1.GraphKeys.UPDATE_OPS``;
  the model function adds those of its call on the features to the collection
  (:func:`distributed.model.keras.add_model_updates`, which also serves functional
  models) so the framework runs them with the train op (and averages the
  statistics across workers).
* **Stable variable names.** Keras numbers unnamed layers per graph
  (``dense``, ``dense_1``, ...), so a layer created in one mode only would shift
  the names of the others. Every layer here has an explicit name, and the
  model is named ``keras_cnn``, so the train graph and the predict graph (which
  the restore job builds in a fresh graph and matches against the checkpoint
  by name) hold the same names: ``keras_cnn/conv_<i>/kernel``,
  ``keras_cnn/bn_<i>/{gamma,beta,moving_mean,moving_variance}``,
  ``keras_cnn/logits/{kernel,bias}``.
* **A new model per call.** Keras variables belong to the graph they were
  created in, so the model is built inside the model function, never once at
  import time. Each call creates fresh variables: call it once per graph.

``tf_keras`` is imported directly, which works whatever ``TF_USE_LEGACY_KERAS``
says (that variable only decides what ``tf.keras`` means: Keras 3 without it,
and Keras 3 layers do not work in a ``tf.compat.v1`` graph). Use
``tf_keras.layers``, not ``tf.keras.layers``, in models like this one.
"""

from __future__ import annotations

from typing import Any, Mapping

import tensorflow as tf

from distributed.errors import ConfigError
from distributed.examples.digits import IMAGE_KEY
from distributed.model.keras import add_model_updates, model_losses
from distributed.model import EVAL, PREDICT, TRAIN, ModelSpec, check_mode


def _tf_keras() -> Any:
    """Imports ``tf_keras``, or raises :class:`ConfigError` saying how to get it."""
    try:
        import tf_keras
    except (ImportError, AttributeError) as e:
        version = ".".join(tf.__version__.split(".")[:2])
        raise ConfigError(
            f"model: this model needs the tf_keras package (Keras 2) matching "
            f"TensorFlow {tf.__version__}, and importing it failed ({e}); run "
            f"`pip install 'tf_keras=={version}.*'` on every node (or add it to "
            "the job's runtime_env pip list)") from e
    return tf_keras


def _build_cnn(keras: Any, params: Mapping[str, Any]) -> Any:
    """The uncompiled ``keras_cnn`` Sequential model; every layer named."""
    seed = int(params.get("seed", 0))
    l2 = float(params.get("l2", 0.0))
    momentum = float(params.get("bn_momentum", 0.9))
    regularizer = keras.regularizers.L2(l2) if l2 else None
    layers = [keras.layers.Reshape((8, 8, 1), name="to_image")]
    for i, filters in enumerate(params.get("filters", [16, 32])):
        layers += [
            # No bias: batch norm's beta replaces it.
            keras.layers.Conv2D(
                int(filters), 3, padding="same", use_bias=False, name=f"conv_{i}",
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i),
                kernel_regularizer=regularizer),
            keras.layers.BatchNormalization(momentum=momentum, name=f"bn_{i}"),
            keras.layers.ReLU(name=f"relu_{i}"),
            keras.layers.MaxPooling2D(2, padding="same", name=f"pool_{i}"),
        ]
    layers += [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(
            int(params.get("num_classes", 10)), name="logits",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1000),
            kernel_regularizer=regularizer),
    ]
    return keras.Sequential(layers, name="keras_cnn")


def keras_cnn_model_fn(features: Mapping[str, tf.Tensor], labels: Any, mode: str,
                       params: Mapping[str, Any]) -> ModelSpec:
    """A two-layer ``tf_keras`` convnet with batch norm for 8x8 digits.

    The same network as :func:`distributed.examples.digits.cnn_bn_model_fn`,
    written with ``tf_keras.layers``: each block is a 3x3 ``Conv2D`` (no bias),
    ``BatchNormalization``, ReLU and 2x2 max-pooling, then a ``Dense`` ``logits``
    layer. Train mode normalizes with batch statistics and puts the moving-
    average updates in ``UPDATE_OPS``; eval and predict modes read the moving
    statistics, so ``selection: {policy: inference}`` keeps them.

    Args:
        features: ``{"image": float [B, 64]}`` (8x8 images, flattened).
        labels: Integer class ids ``[B]``; ``None`` in predict mode.
        mode: One of :data:`distributed.model.MODES`.
        params: ``"filters"`` (default ``[16, 32]``), ``"num_classes"``
            (default 10), ``"bn_momentum"`` (default 0.9), ``"l2"`` (kernel
            weight decay, default 0) and ``"seed"`` (default 0).

    Returns:
        A :class:`ModelSpec` with the mean cross-entropy ``loss`` plus Keras
        regularization losses (not in predict mode) and ``logits``,
        ``probabilities`` and ``classes`` predictions.

    Raises:
        ConfigError: ``tf_keras`` is not installed.
    """
    check_mode(mode, labels)
    keras = _tf_keras()
    return keras_classifier_spec(keras, _build_cnn(keras, params or {}),
                                 features[IMAGE_KEY], labels, mode)


def keras_classifier_spec(keras: Any, model: Any, images: tf.Tensor, labels: Any,
                          mode: str) -> ModelSpec:
    """The :class:`ModelSpec` of a Keras classifier ``model`` called on ``images``.

    Calls it with ``training=(mode == TRAIN)``, puts the batch-norm updates of
    that call where the framework runs them (Keras keeps them on the model,
    not in ``UPDATE_OPS``) and adds its regularization losses (kernel
    regularizers live on the model too) to the mean cross-entropy. Eval mode
    also reports ``accuracy``.
    """
    x = tf.cast(images, tf.float32)
    logits = model(x, training=mode == TRAIN)
    add_model_updates(model, x)
    predictions = {
        "logits": logits,
        "probabilities": tf.nn.softmax(logits, name="probabilities"),
        "classes": tf.argmax(logits, axis=-1, name="classes"),
    }
    if mode == PREDICT:
        return ModelSpec(predictions=predictions)
    loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        tf.cast(labels, tf.int64), logits, from_logits=True))
    regularization = model_losses(model, x)
    if regularization:
        loss += tf.add_n(regularization)
    eval_metrics = {}
    if mode == EVAL:
        eval_metrics["accuracy"] = tf.compat.v1.metrics.accuracy(
            tf.cast(labels, tf.int64), predictions["classes"])
    return ModelSpec(loss=tf.identity(loss, name="loss"), predictions=predictions,
                     eval_metrics=eval_metrics)


__all__ = ["keras_classifier_spec", "keras_cnn_model_fn"]
