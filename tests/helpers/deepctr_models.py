"""DeepCTR's DeepFM as the public-code tests run it: its column specs, the
model built as the library's README builds it, the framework's ``model_fn``
around it (the README's Keras recipe, nothing more), generated clicks, and a
stock ``Saver.restore`` of a checkpoint into DeepCTR's own graph.

DeepCTR (``pip install deepctr``, in the ``dev`` extra) is imported by the
functions that need it, never at this module's import: a test module calls
:func:`import_deepctr` first, which skips it where DeepCTR is missing. Model
and input functions are named in configs as
``"tests.helpers.deepctr_models:deepfm_model_fn"``.

DeepCTR does ``from tensorflow.keras import ...``: that import path is fixed
when TensorFlow is imported (unlike the lazy ``tf.keras`` attribute), so the
one TF world must be entered before TensorFlow is: tests/conftest.py does,
and so do the project's processes.
"""

from __future__ import annotations

import contextlib
import io
import threading

import numpy as np
import pytest
import tensorflow as tf

from distributed.model import EVAL, PREDICT, TRAIN, ModelSpec, check_mode
from distributed.model.keras import add_model_updates, model_losses

USERS, ITEMS, CITIES = 200, 100, 30
SPARSE = {"user": USERS, "item": ITEMS}
DENSE = ("price", "age")
DROPOUT = 0.1


def import_deepctr():
    """Imports DeepCTR (a test module that calls this at its import is
    skipped without it). DeepCTR asks PyPI for a newer version on a thread of
    its own at import and prints a line when it cannot; this waits for that
    thread (at most 10 s) so the line does not land in the test run's
    output."""
    before = set(threading.enumerate())
    with contextlib.redirect_stdout(io.StringIO()):
        module = pytest.importorskip("deepctr", reason="deepctr is in the dev extra")
        for thread in set(threading.enumerate()) - before:
            thread.join(10)
    return module


def feature_columns():
    """DeepCTR's column specs: two id features, one hashed string feature and
    two dense ones."""
    import_deepctr()
    from deepctr.feature_column import DenseFeat, SparseFeat
    sparse = [SparseFeat(name, vocabulary_size=size, embedding_dim=4)
              for name, size in SPARSE.items()]
    sparse.append(SparseFeat("city", vocabulary_size=CITIES, embedding_dim=4,
                             use_hash=True, dtype="string"))
    return sparse + [DenseFeat(name, 1) for name in DENSE]


def build_deepfm(dnn_dropout: float = DROPOUT, l2_reg_embedding: float | None = None):
    """The library's model, built as its README builds it. ``l2_reg_embedding``
    (DeepFM's default 1e-5 if ``None``) is the L2 weight on its tables, the
    linear part's too (``l2_reg_linear``)."""
    import_deepctr()
    from deepctr.models import DeepFM
    columns = feature_columns()
    l2 = {} if l2_reg_embedding is None else {"l2_reg_embedding": l2_reg_embedding,
                                              "l2_reg_linear": l2_reg_embedding}
    return DeepFM(columns, columns, dnn_hidden_units=(16, 8), dnn_use_bn=True,
                  dnn_dropout=dnn_dropout, task="binary", **l2)


def deepfm_model_fn(features, labels, mode, params):
    """DeepFM in the framework: the README's Keras recipe, nothing more.

    ``params["l2_reg_embedding"]``: DeepFM's L2 weight on its tables (see
    :func:`build_deepfm`); with the default 1e-5 each table's gradient is
    dense (the regularizer reads the whole table). DeepCTR attaches the
    regularizer even at 0 (``l2(0)``: still dense), so with 0 the model_fn
    leaves ``model.losses`` out (every term is 0 then: DeepFM's
    ``l2_reg_dnn`` defaults to 0) and each table's gradient is the rows
    looked up (an ``IndexedSlices``).

    For runs compared variable by variable, two params: ``dnn_dropout``
    (default 0.1) is DeepFM's own argument, 0 makes a training step
    deterministic (no dropout mask); ``keras_seed`` seeds Keras' initializer
    seeds (``tf.keras.utils.set_random_seed``) before the model is built.
    DeepFM's last ``Dense(1)`` has an unseeded initializer, whose seed Keras
    draws from Python's ``random``, so without it two runs start from
    different values there (the framework's ``seed`` is TF's graph seed, which
    Keras' stateless initializers do not use)."""
    check_mode(mode, labels)
    if params.get("keras_seed") is not None:
        tf.keras.utils.set_random_seed(params["keras_seed"])
    model = build_deepfm(params.get("dnn_dropout", DROPOUT),
                         params.get("l2_reg_embedding"))
    inputs = {name: features[name] for name in model.input_names}
    probability = model(inputs, training=mode == TRAIN)
    add_model_updates(model, inputs)
    predictions = {"probability": probability}
    if mode == PREDICT:
        return ModelSpec(predictions=predictions)
    labels = tf.cast(tf.reshape(labels, [-1, 1]), tf.float32)
    loss = tf.reduce_mean(tf.keras.losses.binary_crossentropy(labels, probability))
    if params.get("l2_reg_embedding") != 0:
        loss += tf.add_n(model_losses(model, inputs) or [tf.constant(0.0)])
    metrics = {}
    if mode == EVAL:
        metrics = {"auc": tf.compat.v1.metrics.auc(labels, probability),
                   "accuracy": tf.compat.v1.metrics.accuracy(
                       labels, tf.cast(probability > 0.5, tf.float32))}
    return ModelSpec(loss=loss, predictions=predictions, eval_metrics=metrics)


# -------------------------------------------------------------- the data ---

def click_rows(n: int, seed: int) -> tuple[dict, np.ndarray]:
    """``n`` rows shaped as DeepCTR's inputs (``[n, 1]`` each) and 0/1 clicks
    from a fixed random teacher."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(4321)
    user_w, item_w, city_w = (teacher.normal(size=k) for k in (USERS, ITEMS, CITIES))
    user = rng.integers(USERS, size=n)
    item = rng.integers(ITEMS, size=n)
    city = rng.integers(CITIES, size=n)
    price = rng.random(n).astype(np.float32)
    age = rng.random(n).astype(np.float32)
    score = user_w[user] + item_w[item] + 0.5 * city_w[city] + 1.5 * (price - 0.5)
    labels = (score + rng.normal(scale=0.5, size=n) > 0).astype(np.int64)
    features = {"user": user.astype(np.int32), "item": item.astype(np.int32),
                "city": np.array([f"city-{c}" for c in city], dtype=object),
                "price": price, "age": age}
    return {k: v.reshape(n, 1) for k, v in features.items()}, labels


def deepfm_input_fn(worker_index, num_workers, batch_size, params):
    """Training clicks, a different stream per worker, forever."""
    from tests.helpers.drivers import worker_stream
    return worker_stream(click_rows, 2000, worker_index, num_workers, batch_size)


def deepfm_eval_input_fn(worker_index, num_workers, batch_size, params):
    """256 held-out clicks, once."""
    from tests.helpers.drivers import batches_of
    yield from batches_of(*click_rows(256, seed=8), batch_size)


def stock_predictions(prefix: str, x: dict) -> np.ndarray:
    """DeepCTR's own graph (its ``Input`` placeholders, its output) restored by
    a stock ``Saver``."""
    graph = tf.Graph()
    with graph.as_default():
        model = build_deepfm()
        saver = tf.compat.v1.train.Saver()
    feed = dict(zip(model.inputs, (x[name] for name in model.input_names)))
    with tf.compat.v1.Session(graph=graph) as sess:
        saver.restore(sess, prefix)
        # Keras' learning phase defaults to inference: dropout off, moving statistics.
        return sess.run(model.outputs[0], feed)


def serve(export_dir: str, x: dict) -> np.ndarray:
    """The ``probability`` an exported SavedModel's serving signature gives
    for the rows ``x`` (strings as strings)."""
    served = tf.saved_model.load(export_dir).signatures["serving_default"]
    return served(**{k: tf.constant(v.astype(str) if v.dtype == object else v)
                     for k, v in x.items()})["probability"].numpy()
