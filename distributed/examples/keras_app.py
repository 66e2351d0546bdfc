"""A ``tf_keras.applications`` model (functional Keras) in the framework's graph.

:func:`app_model_fn` builds an application network (``MobileNet`` at width
0.25 by default, ``weights=None``: nothing is downloaded) inside a functional
model with its own ``Input`` and a ``Dense`` head, and calls it on
``features["image"]``. Like every functional model it also holds, in
``model.updates``, the batch-norm updates its layers built on its ``Input``
placeholders; :func:`distributed.model.keras.add_model_updates` keeps only those of
the call on the features. Name it in a config as
``"distributed.examples.keras_app:app_model_fn"``, with
``"distributed.examples.keras_app:app_input_fn"`` as the input: the digits
upscaled to 32x32 colour images.

The application's layers have fixed names (``conv1``, ``conv_dw_1_bn``, ...)
and the head is named ``logits``, so a fresh predict graph (the restore job's)
has the train graph's variable names.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from distributed.examples import digits
from distributed.examples.keras_digits import _tf_keras, keras_classifier_spec
from distributed.model import ModelSpec, check_mode

IMAGE_KEY = "image"
SIZE = 32


def app_arrays(split: str = "train") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The digits ``split`` as ``({"image": float32 [N, 32, 32, 3]}, int64 [N])``:
    each 8x8 digit upscaled 4x (nearest) and tinted differently per channel."""
    features, labels = digits.digits_eval_arrays(split)
    x = features[digits.IMAGE_KEY].reshape(-1, 8, 8).repeat(4, axis=1).repeat(4, axis=2)
    tint = np.array([1.0, 0.7, 0.4], dtype=np.float32)
    return {IMAGE_KEY: (x[..., None] * tint).astype(np.float32)}, labels.astype(np.int64)


def app_input_fn(worker_index: int, num_workers: int, batch_size: int,
                 params: Mapping[str, Any]) -> Iterator:
    """Yields this worker's shard (examples ``i::n``) of :func:`app_arrays`
    forever, reshuffled each epoch; ``params``: ``"split"``, ``"seed"``."""
    digits._check_shard_args(worker_index, num_workers, batch_size)
    params = params or {}
    features, labels = app_arrays(params.get("split", "train"))
    shard = slice(worker_index, None, num_workers)
    rng = np.random.default_rng([int(params.get("seed", 0)), int(worker_index)])
    return digits._epoch_batches(features[IMAGE_KEY][shard], labels[shard],
                                 batch_size, rng)


def _build_app(keras: Any, params: Mapping[str, Any]) -> Any:
    """The functional ``app`` model: ``Input``, the application, a ``logits`` head."""
    app = getattr(keras.applications, params.get("app", "MobileNet"))
    image = keras.Input((SIZE, SIZE, 3), name="image")
    base = app(input_shape=(SIZE, SIZE, 3), include_top=False, weights=None,
               pooling="avg", **dict(params.get("app_args", {"alpha": 0.25})))
    logits = keras.layers.Dense(
        int(params.get("num_classes", 10)), name="logits",
        kernel_initializer=keras.initializers.GlorotUniform(
            seed=int(params.get("seed", 0))))(base(image))
    return keras.Model(image, logits, name="app")


def app_model_fn(features: Mapping[str, tf.Tensor], labels: Any, mode: str,
                 params: Mapping[str, Any]) -> ModelSpec:
    """A ``tf_keras.applications`` network with a dense head, for 32x32x3 images.

    Train mode normalizes with batch statistics and adds the batch-norm
    updates of this call to ``UPDATE_OPS``; eval and predict modes read the
    moving statistics, so ``selection: {policy: inference}`` keeps them.

    Args:
        features: ``{"image": float [B, 32, 32, 3]}``.
        labels: Integer class ids ``[B]``; ``None`` in predict mode.
        mode: One of :data:`distributed.model.MODES`.
        params: ``"app"`` (a ``tf_keras.applications`` function name, default
            ``"MobileNet"``), ``"app_args"`` (its keyword arguments, default
            ``{"alpha": 0.25}``), ``"num_classes"`` (default 10), ``"seed"``.

    Returns:
        A :class:`ModelSpec` with the mean cross-entropy ``loss`` (plus the
        model's regularization losses), ``logits``, ``probabilities`` and
        ``classes``, and ``accuracy`` in eval mode.
    """
    check_mode(mode, labels)
    keras = _tf_keras()
    return keras_classifier_spec(keras, _build_app(keras, params or {}),
                                 features[IMAGE_KEY], labels, mode)


__all__ = ["app_arrays", "app_input_fn", "app_model_fn"]
