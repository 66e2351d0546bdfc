"""A wide-and-deep click model: hashed categorical features into partitioned
embedding tables, plus a dense tower, on data the code generates.

The shape of the recommendation and ranking models still trained in graph
mode (Cheng et al., 2016, and the Estimator's ``DNNLinearCombinedClassifier``):

* **Input** (:func:`clicks_input_fn`): each example is a user id, an item id, an
  item category (int64 ids from large ranges, Zipf-like so a few are frequent)
  and 8 dense features; the label is a click (0/1) drawn from a fixed random
  "teacher" that depends on the user-item affinity, the category and the dense
  features, so the model has something real to learn. The teacher depends only
  on ``params["seed"]``; workers draw different examples.
* **Wide part**: the hashed user x item cross and the hashed category, each a
  one-dimensional embedding (a per-bucket weight) summed into the logit.
* **Deep part**: user and item ids hashed into ``hash_buckets`` rows of one
  shared ``[hash_buckets, embedding_dim]`` table made with
  ``tf.compat.v1.fixed_size_partitioner(partitions)``, the category's own small
  table, concatenated with the dense features into a ReLU tower.

Each step touches a few hundred rows of tables with hundreds of thousands:
the gradients of ``tf.nn.embedding_lookup`` are ``tf.IndexedSlices``, which
the framework exchanges sparsely, and the partitioned tables are saved as one
logical tensor each, as TensorFlow's own ``Saver`` saves them. Adagrad or FTRL
apply the updates sparsely; serving checkpoints drop their slots.

Name it in a config as ``distributed.examples.wide_deep:wide_deep_model_fn``
with ``distributed.examples.wide_deep:clicks_input_fn``
(``jobs/configs/wide_deep.yaml``).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from distributed.model import EVAL, PREDICT, ModelSpec, check_mode

ID_FEATURES = ("user", "item", "category")
DENSE_KEY = "dense"
NUM_DENSE = 8
# Id ranges the generator draws from (before hashing into the tables).
NUM_USERS, NUM_ITEMS, NUM_CATEGORIES = 1_000_000, 200_000, 100

DEFAULTS = {"hash_buckets": 200_000, "embedding_dim": 16, "partitions": 4,
            "cross_buckets": 100_000, "hidden": [64, 32], "seed": 0}


def _params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    unknown = set(params or {}) - set(DEFAULTS) - {"eval_examples"}
    if unknown:
        raise ValueError(f"model_params: unknown key(s) {sorted(unknown)}; valid keys "
                         f"are {sorted(DEFAULTS)}")
    return {**DEFAULTS, **(params or {})}


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------

class _Teacher:
    """The fixed random rule that makes clicks: user and item factors (by id,
    computed from a hash so no table of a million users is held), a bias per
    category and a linear term in the dense features."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 7])
        self.salt = rng.integers(1, 2**31 - 1, size=4)
        self.category_bias = rng.normal(0.0, 1.0, NUM_CATEGORIES)
        self.dense_weights = rng.normal(0.0, 0.5, NUM_DENSE)

    def _factor(self, ids: np.ndarray, salt: int) -> np.ndarray:
        """A deterministic 4-dim factor per id, in [-1, 1]."""
        h = (ids[:, None].astype(np.uint64) * np.uint64(2654435761)
             + np.uint64(salt) * np.arange(1, 5, dtype=np.uint64)) % np.uint64(2**31 - 1)
        return (h.astype(np.float64) / (2**30)) - 1.0

    def logit(self, user, item, category, dense) -> np.ndarray:
        affinity = np.sum(self._factor(user, self.salt[0]) *
                          self._factor(item, self.salt[1]), axis=1)
        return (1.5 * affinity + self.category_bias[category]
                + dense @ self.dense_weights - 0.5)


def click_arrays(num: int, seed: int, stream: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``num`` examples of stream ``stream``: ``({"user", "item", "category":
    int64 [num], "dense": float32 [num, 8]}, clicks int64 [num])``."""
    teacher = _Teacher(seed)
    rng = np.random.default_rng([seed, stream])
    # Zipf-like ids: a few users and items are frequent, most are rare.
    user = (rng.zipf(1.3, num) * 7919) % NUM_USERS
    item = (rng.zipf(1.2, num) * 104729) % NUM_ITEMS
    category = item % NUM_CATEGORIES
    dense = rng.normal(0.0, 1.0, (num, NUM_DENSE)).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-teacher.logit(user, item, category, dense)))
    clicks = (rng.random(num) < p).astype(np.int64)
    features = {"user": user.astype(np.int64), "item": item.astype(np.int64),
                "category": category.astype(np.int64), DENSE_KEY: dense}
    return features, clicks


def clicks_input_fn(worker_index: int, num_workers: int, batch_size: int,
                    params: Mapping[str, Any]) -> Iterator:
    """Yields this worker's batches of fresh click examples, forever.

    Args:
        worker_index: This worker's index, in ``[0, num_workers)``.
        num_workers: Number of workers.
        batch_size: Examples per batch.
        params: ``"seed"`` (the teacher and the draws, default 0).
    """
    if not 0 <= worker_index < num_workers or batch_size < 1:
        raise ValueError(f"clicks_input_fn: bad shard ({worker_index} of "
                         f"{num_workers}) or batch_size {batch_size}")
    seed = int((params or {}).get("seed", 0))
    chunk = 0
    while True:  # 64 batches per draw: fewer numpy calls per example
        features, clicks = click_arrays(64 * batch_size, seed,
                                        1000 + worker_index + num_workers * chunk)
        for start in range(0, len(clicks), batch_size):
            end = start + batch_size
            yield {k: v[start:end] for k, v in features.items()}, clicks[start:end]
        chunk += 1


def clicks_eval_input_fn(worker_index: int, num_workers: int, batch_size: int,
                         params: Mapping[str, Any]) -> Iterator:
    """One pass over a fixed held-out set (``params["eval_examples"]``, default
    4096, stream 0, never drawn by :func:`clicks_input_fn`): an ``eval.input``."""
    params = params or {}
    features, clicks = click_arrays(int(params.get("eval_examples", 4096)),
                                    int(params.get("seed", 0)), stream=0)
    for start in range(worker_index * batch_size, len(clicks), num_workers * batch_size):
        end = start + batch_size
        yield {k: v[start:end] for k, v in features.items()}, clicks[start:end]


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def _hashed(ids: tf.Tensor, buckets: int, salt: str = "") -> tf.Tensor:
    """Ids hashed into ``[0, buckets)``, as ``categorical_column_with_hash_bucket``."""
    text = tf.strings.as_string(ids)
    if salt:
        text = tf.strings.join([text, salt], separator="#")
    return tf.strings.to_hash_bucket_fast(text, buckets)


def _table(name: str, rows: int, dim: int, partitions: int, seed: int):
    """A ``[rows, dim]`` embedding table, partitioned along its rows."""
    partitioner = (tf.compat.v1.fixed_size_partitioner(partitions)
                   if partitions > 1 else None)
    return tf.compat.v1.get_variable(
        name, [rows, dim], partitioner=partitioner,
        initializer=tf.compat.v1.truncated_normal_initializer(
            stddev=1.0 / np.sqrt(dim), seed=seed))


def wide_deep_model_fn(features: Mapping[str, tf.Tensor], labels: Any, mode: str,
                       params: Mapping[str, Any]) -> ModelSpec:
    """The wide-and-deep click model in variable scope ``wide_deep``.

    Args:
        features: ``user``, ``item``, ``category`` (int64 ``[B]``) and ``dense``
            (float32 ``[B, 8]``).
        labels: Clicks ``[B]`` (0/1); ``None`` in predict mode.
        mode: One of :data:`distributed.model.MODES`.
        params: ``hash_buckets`` (rows of the shared id table, default
            200,000), ``embedding_dim`` (16), ``partitions`` (4; 1: not
            partitioned), ``cross_buckets`` (rows of the wide user x item
            cross, 100,000), ``hidden`` ([64, 32]), ``seed`` (0).

    Returns:
        A :class:`ModelSpec` with the mean sigmoid cross-entropy ``loss``,
        ``probability`` and ``logit`` predictions, and ``auc`` and ``accuracy``
        eval metrics.
    """
    check_mode(mode, labels)
    p = _params(params)
    seed = int(p["seed"])
    with tf.compat.v1.variable_scope("wide_deep", reuse=tf.compat.v1.AUTO_REUSE):
        logit = _wide(features, p, seed) + _deep(features, p, seed)
    probability = tf.sigmoid(logit, name="probability")
    predictions = {"probability": probability, "logit": logit}
    if mode == PREDICT:
        return ModelSpec(predictions=predictions)
    clicks = tf.cast(labels, tf.float32)
    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=clicks, logits=logit), name="loss")
    eval_metrics = {}
    if mode == EVAL:
        eval_metrics["auc"] = tf.compat.v1.metrics.auc(clicks, probability)
        eval_metrics["accuracy"] = tf.compat.v1.metrics.accuracy(
            clicks, tf.cast(probability > 0.5, tf.float32))
    return ModelSpec(loss=loss, predictions=predictions, eval_metrics=eval_metrics)


def _wide(features, p, seed) -> tf.Tensor:
    """The linear part: one weight per hashed cross bucket and per category."""
    with tf.compat.v1.variable_scope("wide"):
        cross = _hashed(features["user"] * NUM_ITEMS + features["item"],
                        int(p["cross_buckets"]), salt="cross")
        cross_w = _table("user_x_item", int(p["cross_buckets"]), 1,
                         int(p["partitions"]), seed)
        category_w = _table("category", NUM_CATEGORIES, 1, 1, seed)
        bias = tf.compat.v1.get_variable("bias", [], initializer=tf.zeros_initializer())
        category = tf.math.floormod(features["category"], NUM_CATEGORIES)
        return (tf.reshape(tf.nn.embedding_lookup(cross_w, cross), [-1])
                + tf.reshape(tf.nn.embedding_lookup(category_w, category), [-1]) + bias)


def _deep(features, p, seed) -> tf.Tensor:
    """The tower: shared id embeddings, a category embedding, dense features."""
    with tf.compat.v1.variable_scope("deep"):
        buckets, dim = int(p["hash_buckets"]), int(p["embedding_dim"])
        ids = _table("id_embedding", buckets, dim, int(p["partitions"]), seed)
        categories = _table("category_embedding", NUM_CATEGORIES, 4, 1, seed)
        # The user and item ids in one lookup of their shared table: with the
        # table on parameter servers every lookup is a remote read of each of
        # its parts (13% more steps/s than two lookups on 2 servers).
        users = _hashed(features["user"], buckets, "user")
        rows = tf.nn.embedding_lookup(
            ids, tf.concat([users, _hashed(features["item"], buckets, "item")], 0))
        user_rows, item_rows = tf.split(rows, [tf.size(users), -1], 0)
        x = tf.concat([
            user_rows, item_rows,
            tf.nn.embedding_lookup(categories,
                                   tf.math.floormod(features["category"], NUM_CATEGORIES)),
            tf.cast(features[DENSE_KEY], tf.float32)], axis=1)
        for i, width in enumerate(p["hidden"]):
            w = tf.compat.v1.get_variable(
                f"hidden_{i}/kernel", [int(x.shape[-1]), int(width)],
                initializer=tf.compat.v1.glorot_uniform_initializer(seed=seed + i))
            b = tf.compat.v1.get_variable(f"hidden_{i}/bias", [int(width)],
                                          initializer=tf.zeros_initializer())
            x = tf.nn.relu(tf.matmul(x, w) + b)
        w = tf.compat.v1.get_variable(
            "logit/kernel", [int(x.shape[-1]), 1],
            initializer=tf.compat.v1.glorot_uniform_initializer(seed=seed + 99))
        return tf.reshape(tf.matmul(x, w), [-1])


__all__ = ["click_arrays", "clicks_eval_input_fn", "clicks_input_fn",
           "wide_deep_model_fn"]
