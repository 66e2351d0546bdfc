"""Example models and inputs that follow the contract in :mod:`distributed.model`.

Two inputs and two models, small enough to train on a laptop CPU in seconds:

* :func:`digits_input_fn` reads scikit-learn's bundled 8x8 handwritten digits
  (1797 real images, no download). The first 1500 are the train split, the rest
  the test split; worker ``i`` of ``n`` reads examples ``i::n`` of its split.
* :func:`synthetic_input_fn` draws Gaussian features labelled by a fixed random
  linear teacher, so any size of data exists and the loss can still go down.
* :func:`mlp_model_fn` is a plain multi-layer perceptron: every variable is
  trainable, so a trainable-only checkpoint is enough to serve it.
* :func:`cnn_bn_model_fn` is a small convnet with hand-written batch norm. Its
  ``moving_mean``/``moving_variance`` are non-trainable yet read at inference,
  which is exactly what a trainable-only checkpoint silently drops.

Models are named in a config as, e.g.,
``"distributed.examples.digits:cnn_bn_model_fn"``. Variables are made with
``tf.compat.v1.get_variable`` under a fixed variable scope (``reuse=AUTO_REUSE``)
so names are identical in every mode and a checkpoint written by the train
graph restores into the predict graph. Initial values depend only on
``params["seed"]`` (default 0).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from distributed.model import EVAL, PREDICT, TRAIN, ModelSpec, check_mode

NUM_TRAIN = 1500
"""The first ``NUM_TRAIN`` digits are the train split; the rest are the test split."""
SPLITS = ("train", "test")
IMAGE_KEY = "image"

Batch = tuple[dict[str, np.ndarray], np.ndarray]

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: float32 pixels in [0, 1] of shape [N, 64], int64 labels.

    Reads the CSV that scikit-learn ships (what ``load_digits`` reads) without
    importing scikit-learn, whose import (SciPy included) takes longer than
    building the model; every actor loads the digits while it starts.
    """
    path = _bundled_digits_csv()
    if path is not None:
        data = np.loadtxt(path, delimiter=",")
        pixels, target = data[:, :-1], data[:, -1]
    else:  # a scikit-learn that keeps its data elsewhere
        from sklearn.datasets import load_digits
        bunch = load_digits()
        pixels, target = bunch.data, bunch.target
    images = (pixels / 16.0).astype(np.float32)
    images.flags.writeable = False
    labels = target.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


def _bundled_digits_csv() -> str | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing it."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    return None


def digits_eval_arrays(split: str = "test") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Returns one whole split of the digits, unsharded and in file order.

    Args:
        split: ``"train"`` (first 1500 examples) or ``"test"`` (the other 297).

    Returns:
        ``({"image": float32 [N, 64]}, int64 [N])``, fresh copies the caller may
        modify.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    images, labels = _load_digits()
    part = slice(0, NUM_TRAIN) if split == "train" else slice(NUM_TRAIN, None)
    return {IMAGE_KEY: images[part].copy()}, labels[part].copy()


def _check_shard_args(worker_index: int, num_workers: int, batch_size: int) -> None:
    """Raises ``ValueError`` naming the bad sharding argument."""
    integer = (int, np.integer)
    if not isinstance(num_workers, integer) or num_workers < 1:
        raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
    if not isinstance(worker_index, integer) or not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index: expected an int in [0, {num_workers}), "
                         f"got {worker_index!r}")
    if not isinstance(batch_size, integer) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")


def _epoch_batches(features: np.ndarray, labels: np.ndarray, batch_size: int,
                   rng: np.random.Generator) -> Iterator[Batch]:
    """Yields full batches forever, reshuffling each epoch; batches may span epochs."""
    n = len(labels)
    order = np.empty(0, dtype=np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        take, order = order[:batch_size], order[batch_size:]
        yield {IMAGE_KEY: features[take]}, labels[take]


def digits_input_fn(worker_index: int, num_workers: int, batch_size: int,
                    params: Mapping[str, Any]) -> Iterator[Batch]:
    """Yields this worker's shard of the digits forever, reshuffled each epoch.

    Worker ``i`` of ``n`` reads examples ``i::n`` of the split, so the shards are
    disjoint and together cover it. The shuffle order depends on
    ``params["seed"]`` and the worker index, so runs repeat exactly.

    Args:
        worker_index: This worker's index, in ``[0, num_workers)``.
        num_workers: Number of data-parallel workers.
        batch_size: Examples per batch (per worker); every batch is full.
        params: ``"split"`` (``"train"``, default, or ``"test"``) and ``"seed"``
            (int, default 0).

    Returns:
        An infinite iterator of ``({"image": float32 [B, 64]}, int64 [B])``.
    """
    _check_shard_args(worker_index, num_workers, batch_size)
    params = params or {}
    features, labels = digits_eval_arrays(params.get("split", "train"))
    shard = slice(worker_index, None, num_workers)
    rng = np.random.default_rng([int(params.get("seed", 0)), int(worker_index)])
    return _epoch_batches(features[IMAGE_KEY][shard], labels[shard], batch_size, rng)


def digits_eval_input_fn(worker_index: int, num_workers: int, batch_size: int,
                         params: Mapping[str, Any]) -> Iterator[Batch]:
    """Yields one pass over a split (default ``"test"``, the held-out 297), in
    file order, the last batch partial: an eval input (``eval.input``).

    Args:
        worker_index: This worker's index, in ``[0, num_workers)``.
        num_workers: Number of workers (an evaluation reads with 0 of 1).
        batch_size: Examples per batch.
        params: ``"eval_split"`` (``"test"``, default, or ``"train"``).
    """
    _check_shard_args(worker_index, num_workers, batch_size)
    features, labels = digits_eval_arrays((params or {}).get("eval_split", "test"))
    images = features[IMAGE_KEY][worker_index::num_workers]
    labels = labels[worker_index::num_workers]
    for start in range(0, len(labels), batch_size):
        yield {IMAGE_KEY: images[start:start + batch_size]}, labels[start:start + batch_size]


def synthetic_input_fn(worker_index: int, num_workers: int, batch_size: int,
                       params: Mapping[str, Any]) -> Iterator[Batch]:
    """Yields Gaussian features labelled by a fixed random linear teacher, forever.

    The teacher depends only on ``params["seed"]``, so every worker labels by
    the same rule; the features depend on the seed and the worker index, so
    workers see different examples. ``label = argmax(x @ W + b)`` is learnable
    by any of the example models.

    Args:
        worker_index: This worker's index, in ``[0, num_workers)``.
        num_workers: Number of data-parallel workers.
        batch_size: Examples per batch (per worker).
        params: ``"features"`` (default 64), ``"classes"`` (default 10) and
            ``"seed"`` (default 0).

    Returns:
        An infinite iterator of ``({"image": float32 [B, F]}, int64 [B])``.
    """
    _check_shard_args(worker_index, num_workers, batch_size)
    params = params or {}
    num_features = int(params.get("features", 64))
    num_classes = int(params.get("classes", 10))
    if num_features < 1 or num_classes < 2:
        raise ValueError("params: expected features >= 1 and classes >= 2, got "
                         f"features={num_features}, classes={num_classes}")
    seed = int(params.get("seed", 0))
    teacher = np.random.default_rng([seed, 2**31 - 1])
    weights = teacher.normal(size=(num_features, num_classes)).astype(np.float32)
    bias = teacher.normal(scale=0.1, size=num_classes).astype(np.float32)
    rng = np.random.default_rng([seed, int(worker_index)])

    def batches() -> Iterator[Batch]:
        while True:
            x = rng.normal(size=(batch_size, num_features)).astype(np.float32)
            y = np.argmax(x @ weights + bias, axis=1).astype(np.int64)
            yield {IMAGE_KEY: x}, y

    return batches()


# ---------------------------------------------------------------------------
# Model building blocks
# ---------------------------------------------------------------------------


def _glorot(seed: int) -> Any:
    """A seeded Glorot-uniform initializer (deterministic in graph mode)."""
    return tf.compat.v1.glorot_uniform_initializer(seed=seed)


def _dense(x: tf.Tensor, units: int, name: str, seed: int) -> tf.Tensor:
    """``x @ kernel + bias`` with variables ``<name>/kernel`` and ``<name>/bias``."""
    with tf.compat.v1.variable_scope(name):
        kernel = tf.compat.v1.get_variable(
            "kernel", [int(x.shape[-1]), units], initializer=_glorot(seed))
        bias = tf.compat.v1.get_variable(
            "bias", [units], initializer=tf.compat.v1.zeros_initializer())
    return tf.nn.bias_add(tf.matmul(x, kernel), bias)


def _head(logits: tf.Tensor, labels: Any, mode: str) -> ModelSpec:
    """Softmax predictions, plus the mean sparse cross-entropy outside predict mode."""
    predictions = {
        "logits": logits,
        "probabilities": tf.nn.softmax(logits, name="probabilities"),
        "classes": tf.argmax(logits, axis=-1, name="classes"),
    }
    loss = None
    if mode != PREDICT:
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(labels, tf.int64), logits=logits),
            name="loss")
    eval_metrics = {}
    if mode == EVAL:
        eval_metrics["accuracy"] = tf.compat.v1.metrics.accuracy(
            tf.cast(labels, tf.int64), predictions["classes"])
    return ModelSpec(loss=loss, predictions=predictions, eval_metrics=eval_metrics)


def _batch_norm(x: tf.Tensor, mode: str, momentum: float,
                epsilon: float = 1e-3) -> tf.Tensor:
    """Batch norm over all axes but the last, in variable scope ``bn``.

    Train mode normalizes with the batch statistics and adds the moving-average
    updates to ``UPDATE_OPS``; eval and predict modes read the moving statistics.
    """
    channels = int(x.shape[-1])
    moving = dict(
        trainable=False,
        collections=[tf.compat.v1.GraphKeys.GLOBAL_VARIABLES,
                     tf.compat.v1.GraphKeys.MOVING_AVERAGE_VARIABLES])
    with tf.compat.v1.variable_scope("bn"):
        gamma = tf.compat.v1.get_variable(
            "gamma", [channels], initializer=tf.compat.v1.ones_initializer())
        beta = tf.compat.v1.get_variable(
            "beta", [channels], initializer=tf.compat.v1.zeros_initializer())
        moving_mean = tf.compat.v1.get_variable(
            "moving_mean", [channels],
            initializer=tf.compat.v1.zeros_initializer(), **moving)
        moving_variance = tf.compat.v1.get_variable(
            "moving_variance", [channels],
            initializer=tf.compat.v1.ones_initializer(), **moving)
        if mode == TRAIN:
            mean, variance = tf.nn.moments(x, axes=list(range(x.shape.ndims - 1)))
            decay = 1.0 - momentum
            for var, value in ((moving_mean, mean), (moving_variance, variance)):
                update = tf.compat.v1.assign_sub(var, (var - value) * decay)
                tf.compat.v1.add_to_collection(
                    tf.compat.v1.GraphKeys.UPDATE_OPS, update)
        else:
            mean, variance = moving_mean, moving_variance
    return tf.nn.batch_normalization(x, mean, variance, beta, gamma, epsilon)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def mlp_model_fn(features: Mapping[str, tf.Tensor], labels: Any, mode: str,
                 params: Mapping[str, Any]) -> ModelSpec:
    """A ReLU multi-layer perceptron classifier in variable scope ``mlp``.

    Variables: ``mlp/dense_<i>/{kernel,bias}`` per hidden layer and
    ``mlp/logits/{kernel,bias}``, all trainable.

    Args:
        features: ``{"image": float [B, F]}``.
        labels: Integer class ids ``[B]``; ``None`` in predict mode.
        mode: One of :data:`distributed.model.MODES`.
        params: ``"hidden"`` (layer widths, default ``[256, 256]``),
            ``"num_classes"`` (default 10) and ``"seed"`` (default 0).

    Returns:
        A :class:`ModelSpec` with the mean cross-entropy ``loss`` (not in predict
        mode) and ``logits``, ``probabilities`` and ``classes`` predictions.
    """
    check_mode(mode, labels)
    params = params or {}
    seed = int(params.get("seed", 0))
    x = tf.cast(features[IMAGE_KEY], tf.float32)
    with tf.compat.v1.variable_scope("mlp", reuse=tf.compat.v1.AUTO_REUSE):
        for i, width in enumerate(params.get("hidden", [256, 256])):
            x = tf.nn.relu(_dense(x, int(width), f"dense_{i}", seed + i))
        logits = _dense(x, int(params.get("num_classes", 10)), "logits", seed + 1000)
    return _head(logits, labels, mode)


def cnn_bn_model_fn(features: Mapping[str, tf.Tensor], labels: Any, mode: str,
                    params: Mapping[str, Any]) -> ModelSpec:
    """A two-layer convnet with batch norm for 8x8 digits, in variable scope ``cnn``.

    Each ``conv_<i>`` is a 3x3 SAME convolution (no bias; batch norm's beta
    replaces it), batch norm, ReLU and 2x2 max-pooling; then a dense ``logits``
    layer. Variables: ``cnn/conv_<i>/kernel``, ``cnn/conv_<i>/bn/{gamma,beta}``
    and ``cnn/logits/{kernel,bias}`` are trainable;
    ``cnn/conv_<i>/bn/{moving_mean,moving_variance}`` are not, but predict mode
    reads them, so a servable checkpoint must include them.

    Args:
        features: ``{"image": float [B, 64]}`` (8x8 images, flattened).
        labels: Integer class ids ``[B]``; ``None`` in predict mode.
        mode: One of :data:`distributed.model.MODES`.
        params: ``"filters"`` (default ``[16, 32]``), ``"num_classes"``
            (default 10), ``"bn_momentum"`` (default 0.9) and ``"seed"``
            (default 0).

    Returns:
        A :class:`ModelSpec` like :func:`mlp_model_fn`'s.
    """
    check_mode(mode, labels)
    params = params or {}
    seed = int(params.get("seed", 0))
    momentum = float(params.get("bn_momentum", 0.9))
    x = tf.reshape(tf.cast(features[IMAGE_KEY], tf.float32), [-1, 8, 8, 1])
    with tf.compat.v1.variable_scope("cnn", reuse=tf.compat.v1.AUTO_REUSE):
        for i, filters in enumerate(params.get("filters", [16, 32])):
            with tf.compat.v1.variable_scope(f"conv_{i}"):
                kernel = tf.compat.v1.get_variable(
                    "kernel", [3, 3, int(x.shape[-1]), int(filters)],
                    initializer=_glorot(seed + i))
                x = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
                x = tf.nn.relu(_batch_norm(x, mode, momentum))
                x = tf.nn.max_pool2d(x, ksize=2, strides=2, padding="SAME")
        x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])
        logits = _dense(x, int(params.get("num_classes", 10)), "logits", seed + 1000)
    return _head(logits, labels, mode)


__all__ = [
    "NUM_TRAIN", "digits_input_fn", "digits_eval_arrays", "digits_eval_input_fn",
    "synthetic_input_fn", "mlp_model_fn", "cnn_bn_model_fn",
]
