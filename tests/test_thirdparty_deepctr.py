"""Public model code: DeepCTR's DeepFM, a library-built Keras functional model
with embeddings.

DeepCTR (``pip install deepctr``, Apache-2.0, in the ``dev`` extra; pure Python,
it changes no TensorFlow, tf_keras, NumPy or Ray version) builds its models
from ``tensorflow.keras`` (Keras 2 here only through ``TF_USE_LEGACY_KERAS=1``,
which :mod:`distributed.tfworld` sets in every process). ``DeepFM`` is used as
its README shows: ``SparseFeat``/``DenseFeat`` columns in, a functional
``Model`` out, with a linear part, per-feature ``Embedding`` tables (sparse
gradients, L2 regularizers in ``model.losses``), an FM interaction and a DNN
with batch norm (updates in ``model.updates``) and dropout. One sparse feature
is a raw string the model hashes itself (``use_hash=True``).

The model_fn below is the framework's Keras recipe (README "Keras 2 (tf_keras)
layers"): call the model on ``features`` with ``training``, hand the call's
updates and losses on with :mod:`distributed.model.keras`. Data: clicks from a fixed
random teacher, made in code.

The end-to-end test trains on 2 workers with evaluation, exports with
``python -m jobs.restore`` (a subprocess, ``TF_USE_LEGACY_KERAS`` unset), and
checks the SavedModel against a stock ``tf.compat.v1.train.Saver.restore`` of
the same checkpoint into DeepCTR's own graph (the functional model's own
``Input`` placeholders and outputs, no model_fn).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading

# DeepCTR does `from tensorflow.keras import ...`: that import path is fixed
# when TensorFlow is imported (unlike the lazy `tf.keras` attribute), so the
# one TF world must be entered before TensorFlow is: tests/conftest.py does.
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from distributed.model.keras import add_model_updates, model_losses  # noqa: E402
from distributed.model import EVAL, PREDICT, TRAIN, ModelSpec, check_mode  # noqa: E402


def _import_deepctr():
    """Imports DeepCTR, which asks PyPI for a newer version on a thread of its
    own at import and prints a line when it cannot; waits for that thread (at
    most 10 s) so the line does not land in the test run's output."""
    before = set(threading.enumerate())
    with contextlib.redirect_stdout(io.StringIO()):
        module = pytest.importorskip("deepctr", reason="deepctr is in the dev extra")
        for thread in set(threading.enumerate()) - before:
            thread.join(10)
    return module


_import_deepctr()

USERS, ITEMS, CITIES = 200, 100, 30
SPARSE = {"user": USERS, "item": ITEMS}
DENSE = ("price", "age")


def feature_columns():
    """DeepCTR's column specs: two id features, one hashed string feature and
    two dense ones."""
    from deepctr.feature_column import DenseFeat, SparseFeat
    sparse = [SparseFeat(name, vocabulary_size=size, embedding_dim=4)
              for name, size in SPARSE.items()]
    sparse.append(SparseFeat("city", vocabulary_size=CITIES, embedding_dim=4,
                             use_hash=True, dtype="string"))
    return sparse + [DenseFeat(name, 1) for name in DENSE]


def build_deepfm():
    """The library's model, built as its README builds it."""
    from deepctr.models import DeepFM
    columns = feature_columns()
    return DeepFM(columns, columns, dnn_hidden_units=(16, 8), dnn_use_bn=True,
                  dnn_dropout=0.1, task="binary")


def deepfm_model_fn(features, labels, mode, params):
    """DeepFM in the framework: the README's Keras recipe, nothing more."""
    check_mode(mode, labels)
    model = build_deepfm()
    inputs = {name: features[name] for name in model.input_names}
    probability = model(inputs, training=mode == TRAIN)
    add_model_updates(model, inputs)
    predictions = {"probability": probability}
    if mode == PREDICT:
        return ModelSpec(predictions=predictions)
    labels = tf.cast(tf.reshape(labels, [-1, 1]), tf.float32)
    loss = tf.reduce_mean(tf.keras.losses.binary_crossentropy(labels, probability))
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


# ------------------------------------------------------------ unit tests ---

def test_deepfm_in_a_v1_graph_has_embeddings_updates_and_losses_of_the_call():
    from distributed.inputs.spec import InputSpec
    x, y = click_rows(32, seed=0)
    with tf.Graph().as_default() as graph:
        features, labels = InputSpec.from_batch(x, y, "clicks").placeholders()
        spec = deepfm_model_fn(features, labels, TRAIN, {})
        updates = graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
        names = {v.op.name for v in tf.compat.v1.global_variables()}
    assert {"sparse_emb_user/embeddings", "sparse_emb_item/embeddings",
            "sparse_emb_city/embeddings"} <= names
    assert [n for n in names if n.endswith("moving_mean")]
    assert len(updates) == 4  # two batch-norm layers, mean and variance each
    assert spec.loss.shape == ()


# ------------------------------------------------------------ end to end ---

STEPS = 40


@pytest.mark.slow
@pytest.mark.ray
def test_deepfm_trains_on_two_workers_evaluates_and_exports(storage, tmp_path):
    from distributed.checkpoint import RunLayout
    from tests.helpers.drivers import train_and_export

    run, export = "deepfm", tmp_path / "export"
    serving = train_and_export(__name__, "deepfm_model_fn", "deepfm_input_fn",
                               "deepfm_eval_input_fn",
                               {"name": "adam", "learning_rate": 0.01},
                               storage, run, str(export), steps=STEPS)
    assert {"eval/auc", "eval/accuracy", "eval/loss"} <= set(serving[-1].metrics)
    assert serving[-1].metrics["eval/auc"] > 0.6, serving[-1].metrics
    prefix = os.path.join(RunLayout(storage, run).checkpoint_dir("serving", STEPS),
                          "model.ckpt")
    names = {n for n, _ in tf.train.list_variables(prefix)}
    assert not [n for n in names if "Adam" in n or n == "global_step"], names
    # The batch-norm statistics were trained (their updates ran) and are saved.
    reader = tf.train.load_checkpoint(prefix)
    means = [n for n in names if n.endswith("moving_mean")]
    assert len(means) == 2 and all(np.abs(reader.get_tensor(n)).max() > 0 for n in means)

    x, _ = click_rows(200, seed=99)
    served = tf.saved_model.load(str(export / str(STEPS))).signatures["serving_default"]
    got = served(**{k: tf.constant(v.astype(str) if v.dtype == object else v)
                    for k, v in x.items()})["probability"].numpy()
    want = stock_predictions(prefix, x)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6), np.abs(got - want).max()
