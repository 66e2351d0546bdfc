"""A Keras 2 (``tf_keras``) convnet with batch norm, in the framework's graph.

:func:`keras_cnn_model_fn` follows the contract in :mod:`distributed.model`,
but builds its layers with ``tf_keras`` (the Keras 2 package) instead of
``get_variable`` and ``tf.nn`` ops. It trains on the digits inputs of
:mod:`distributed.examples.digits`; name it in a config as
``"distributed.examples.keras_digits:keras_cnn_model_fn"``.

Three things make a Keras model behave in a ``tf.compat.v1`` graph:

* **Batch-norm updates.** Keras layers in graph mode keep their moving-average
  updates in ``model.updates``, not in ``tf.compat.v1.GraphKeys.UPDATE_OPS``;
  the model function adds them to the collection so the framework runs them
  with the train op (and averages the statistics across workers).
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
from distributed.model import MODES, PREDICT, TRAIN, ModelSpec


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
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode != PREDICT and labels is None:
        raise ValueError(f"labels: required in {mode!r} mode, got None")
    keras = _tf_keras()
    model = _build_cnn(keras, params or {})
    logits = model(tf.cast(features[IMAGE_KEY], tf.float32), training=mode == TRAIN)
    # Keras keeps batch-norm updates on the model; the framework runs UPDATE_OPS.
    collected = tf.compat.v1.get_collection_ref(tf.compat.v1.GraphKeys.UPDATE_OPS)
    known = {id(op) for op in collected}
    collected.extend(op for op in model.updates if id(op) not in known)
    predictions = {
        "logits": logits,
        "probabilities": tf.nn.softmax(logits, name="probabilities"),
        "classes": tf.argmax(logits, axis=-1, name="classes"),
    }
    if mode == PREDICT:
        return ModelSpec(predictions=predictions)
    loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        tf.cast(labels, tf.int64), logits, from_logits=True))
    if model.losses:  # kernel_regularizer terms live on the model, not in a collection
        loss += tf.add_n(model.losses)
    return ModelSpec(loss=tf.identity(loss, name="loss"), predictions=predictions)


__all__ = ["keras_cnn_model_fn"]
