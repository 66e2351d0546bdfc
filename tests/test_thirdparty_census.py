"""Public model code: an Estimator wide-and-deep over the census feature columns.

The feature columns are tensorflow/models' own, ``build_model_columns()`` of
``official/r1/wide_deep/census_dataset.py`` (vendored unmodified with its
licence under ``tests/thirdparty/census/``): ``categorical_column_with_
vocabulary_list`` (lookup tables), a hashed column and its ``embedding_column``,
``bucketized_column``, ``crossed_column``, ``indicator_column`` and numeric
columns. TensorFlow 2.16+ has no ``tf.estimator``, so the canned
``DNNLinearCombinedClassifier`` that ``census_main.py`` trains is replaced by
the Estimator ``model_fn`` below, written as an Estimator user writes one
(``input_layer`` for the deep part, ``linear_model`` for the wide part, its own
optimizers in a ``train_op``, ``eval_metric_ops``), adapted with
``distributed.model.estimator.from_estimator``. It adds one column of its own, a
vocabulary list *with* ``num_oov_buckets`` and its embedding (the census
columns have none).

The data are census-like rows made in code (no download): raw strings,
out-of-vocabulary values included, labelled by a fixed random teacher.

The end-to-end test trains on 2 workers with evaluation, exports with
``python -m jobs.restore`` (a subprocess, ``TF_USE_LEGACY_KERAS`` unset), and
checks the SavedModel, fed raw strings, against a stock
``tf.compat.v1.train.Saver.restore`` of the same checkpoint into the
model_fn's own predict graph.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import types

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from distributed.model.estimator import EstimatorSpec, ModeKeys, from_estimator  # noqa: E402

# tf.compat.v1.layers and its base layer say they are deprecated at each call.
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated:UserWarning")

# ------------------------------------------------------- the public code ---


def census_dataset():
    """The vendored ``census_dataset`` module.

    It imports ``official.utils.flags.core`` (tensorflow/models' flag helpers)
    only for the help text of its download flag; where that package is not
    installed a stub with ``help_wrap`` stands in. Nothing else is changed.
    """
    name = "tests.thirdparty.census.census_dataset"
    if name in sys.modules:
        return sys.modules[name]
    try:
        importlib.import_module("official.utils.flags.core")
        return importlib.import_module(name)
    except ImportError:
        pass
    stubs = {n: types.ModuleType(n) for n in (
        "official", "official.utils", "official.utils.flags", "official.utils.flags.core")}
    stubs["official"].utils = stubs["official.utils"]
    stubs["official.utils"].flags = stubs["official.utils.flags"]
    stubs["official.utils.flags"].core = stubs["official.utils.flags.core"]
    stubs["official.utils.flags.core"].help_wrap = lambda text, *args, **kwargs: text
    saved = {n: sys.modules.get(n) for n in stubs}
    sys.modules.update(stubs)
    try:
        return importlib.import_module(name)
    finally:  # the stubs stay only where census_dataset holds them
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module


VENDORED_SHA256 = "86fdbf537f21b9ce7c539baa52f4aac2dc5635c929737a049ba6ff6f17c709a4"
"""Of ``tests/thirdparty/census/census_dataset.py`` as published upstream."""


# ------------------------------------------------------------- the model ---

COUNTRIES = ["United-States", "Mexico", "Philippines", "Germany", "Canada",
             "India", "England", "Cuba", "China", "Jamaica"]
"""Our column's vocabulary (the census columns leave native_country out)."""

PARAMS = {"hidden_units": [16, 8], "oov_buckets": 2}


def columns(params):
    """The census wide and deep columns plus ours: ``native_country`` as a
    vocabulary list with OOV buckets, in the wide part and embedded in the deep."""
    wide, deep = census_dataset().build_model_columns()
    country = tf.compat.v1.feature_column.categorical_column_with_vocabulary_list(
        "native_country", COUNTRIES, num_oov_buckets=params["oov_buckets"])
    return (wide + [country],
            deep + [tf.compat.v1.feature_column.embedding_column(country, dimension=4)])


def census_estimator_model_fn(features, labels, mode, params):
    """A wide-and-deep Estimator ``model_fn``, as DNNLinearCombinedClassifier
    builds one: a DNN over the deep columns plus a linear model over the wide
    ones, sigmoid cross-entropy, FTRL for the linear part and Adagrad for the
    DNN."""
    wide_columns, deep_columns = columns({**PARAMS, **params})
    with tf.compat.v1.variable_scope("dnn"):
        net = tf.compat.v1.feature_column.input_layer(features, deep_columns)
        for i, units in enumerate(params.get("hidden_units", PARAMS["hidden_units"])):
            net = tf.compat.v1.layers.dense(net, units, activation=tf.nn.relu,
                                            name=f"hiddenlayer_{i}")
        dnn_logits = tf.compat.v1.layers.dense(net, 1, name="logits")
    with tf.compat.v1.variable_scope("linear"):
        linear_logits = tf.compat.v1.feature_column.linear_model(features, wide_columns)
    logits = dnn_logits + linear_logits
    probability = tf.sigmoid(logits)
    predictions = {
        "logits": logits,
        "probability": probability,
        "class_ids": tf.cast(probability > 0.5, tf.int64),
        "classes": tf.where(probability > 0.5, tf.fill(tf.shape(logits), ">50K"),
                            tf.fill(tf.shape(logits), "<=50K")),
    }
    if mode == ModeKeys.PREDICT:
        return EstimatorSpec(mode, predictions=predictions)
    labels = tf.cast(tf.reshape(labels, [-1, 1]), tf.float32)
    loss = tf.compat.v1.losses.sigmoid_cross_entropy(labels, logits)
    if mode == ModeKeys.EVAL:
        return EstimatorSpec(mode, predictions=predictions, loss=loss, eval_metric_ops={
            "accuracy": tf.compat.v1.metrics.accuracy(labels, predictions["class_ids"]),
            "auc": tf.compat.v1.metrics.auc(labels, probability)})
    step = tf.compat.v1.train.get_global_step()
    dnn_vars = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES, "dnn")
    linear_vars = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES,
                                              "linear")
    train_op = tf.group(
        tf.compat.v1.train.AdagradOptimizer(0.05).minimize(loss, var_list=dnn_vars),
        tf.compat.v1.train.FtrlOptimizer(0.05).minimize(loss, var_list=linear_vars),
        tf.compat.v1.assign_add(step, 1))
    return EstimatorSpec(mode, predictions=predictions, loss=loss, train_op=train_op)


model_fn = from_estimator(census_estimator_model_fn)


# -------------------------------------------------------------- the data ---

_VOCAB = {
    "education": ["Bachelors", "HS-grad", "11th", "Masters", "9th", "Some-college",
                  "Assoc-acdm", "Assoc-voc", "7th-8th", "Doctorate", "Prof-school"],
    "marital_status": ["Married-civ-spouse", "Divorced", "Never-married", "Separated",
                       "Widowed"],
    "relationship": ["Husband", "Not-in-family", "Wife", "Own-child", "Unmarried"],
    "workclass": ["Self-emp-not-inc", "Private", "State-gov", "Federal-gov",
                  "Local-gov", "?", "Self-emp-inc"],
    "occupation": ["Tech-support", "Craft-repair", "Other-service", "Sales",
                   "Exec-managerial", "Prof-specialty", "Handlers-cleaners",
                   "Machine-op-inspct", "Adm-clerical", "Farming-fishing"],
    # Two values outside COUNTRIES land in the OOV buckets.
    "native_country": COUNTRIES + ["Atlantis", "Lemuria"],
}
# Values no vocabulary knows: dropped by the census columns (no OOV buckets),
# hashed into our column's OOV buckets.
_UNSEEN = {"education": "Kindergarten", "workclass": "Pirate",
           "native_country": "El-Dorado"}
_NUMERIC = ("age", "education_num", "capital_gain", "capital_loss", "hours_per_week")


def census_rows(n: int, seed: int) -> tuple[dict, np.ndarray]:
    """``n`` census-like rows (string columns as object arrays of ``str``,
    numbers as float32) and 0/1 labels from a fixed random teacher."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(1234)
    features, score = {}, np.zeros(n)
    for name, vocab in _VOCAB.items():
        weights = teacher.normal(size=len(vocab))
        index = rng.integers(len(vocab), size=n)
        score += weights[index]
        features[name] = np.array(vocab, dtype=object)[index]
        unseen = rng.random(n) < 0.03
        if name in _UNSEEN:
            features[name][unseen] = _UNSEEN[name]
    features["age"] = rng.integers(17, 80, size=n).astype(np.float32)
    features["education_num"] = rng.integers(1, 17, size=n).astype(np.float32)
    features["capital_gain"] = (rng.random(n) < 0.1) * rng.integers(0, 20000, size=n)
    features["capital_loss"] = (rng.random(n) < 0.05) * rng.integers(0, 3000, size=n)
    features["hours_per_week"] = rng.integers(10, 70, size=n).astype(np.float32)
    for name in ("capital_gain", "capital_loss"):
        features[name] = features[name].astype(np.float32)
    score += 0.04 * (features["age"] - 40) + 0.15 * (features["education_num"] - 9)
    labels = (score + rng.normal(scale=0.5, size=n) > np.median(score)).astype(np.int64)
    return features, labels


def census_input_fn(worker_index, num_workers, batch_size, params):
    """Training rows, a different stream per worker, forever."""
    from tests.helpers.drivers import worker_stream
    return worker_stream(census_rows, 1000, worker_index, num_workers, batch_size)


def census_eval_input_fn(worker_index, num_workers, batch_size, params):
    """256 held-out rows, once."""
    from tests.helpers.drivers import batches_of
    yield from batches_of(*census_rows(256, seed=7), batch_size)


# ------------------------------------------------------------ unit tests ---

def _placeholders(x):
    return {k: tf.compat.v1.placeholder(tf.string if v.dtype == object else tf.float32,
                                        [None], name=k) for k, v in x.items()}


def stock_predictions(prefix: str, x: dict) -> dict:
    """The model_fn's own predict graph, restored by a stock ``Saver``."""
    graph = tf.Graph()
    with graph.as_default():
        features = _placeholders(x)
        spec = census_estimator_model_fn(features, None, ModeKeys.PREDICT, {})
        saver = tf.compat.v1.train.Saver()
        init_tables = tf.compat.v1.tables_initializer()
    with tf.compat.v1.Session(graph=graph) as sess:
        saver.restore(sess, prefix)
        sess.run(init_tables)
        return sess.run(spec.predictions, {features[k]: v for k, v in x.items()})


def test_the_vendored_file_is_unmodified():
    path = os.path.join(os.path.dirname(__file__), "thirdparty", "census",
                        "census_dataset.py")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == VENDORED_SHA256


def test_public_columns_build_and_the_model_learns_in_one_process():
    """Plain TF, no framework: the columns, tables and sparse gradients work in
    a graph, and the teacher is learnable."""
    x, y = census_rows(512, seed=0)
    graph = tf.Graph()
    with graph.as_default():
        features = _placeholders(x)
        labels = tf.compat.v1.placeholder(tf.int64, [None])
        tf.compat.v1.train.get_or_create_global_step()
        spec = census_estimator_model_fn(features, labels, ModeKeys.TRAIN, {})
        init = [tf.compat.v1.global_variables_initializer(),
                tf.compat.v1.tables_initializer()]
    names = {v.op.name for v in graph.get_collection("trainable_variables")}
    assert "dnn/input_layer/occupation_embedding/embedding_weights" in names
    assert "dnn/input_layer/native_country_embedding/embedding_weights" in names
    assert "linear/linear_model/education_X_occupation/weights" in names
    with tf.compat.v1.Session(graph=graph) as sess:
        sess.run(init)
        losses = []
        for _ in range(60):
            losses.append(sess.run([spec.loss, spec.train_op],
                                   {**{features[k]: v for k, v in x.items()},
                                    labels: y})[0])
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])


# ------------------------------------------------------------ end to end ---

STEPS = 40


@pytest.mark.slow
@pytest.mark.ray
def test_census_estimator_trains_on_two_workers_evaluates_and_exports_raw_strings(
        storage, tmp_path):
    from distributed.checkpoint import RunLayout
    from tests.helpers.drivers import train_and_export

    run, export = "census", tmp_path / "export"
    serving = train_and_export(__name__, "model_fn", "census_input_fn",
                               "census_eval_input_fn",
                               {"name": "adagrad", "learning_rate": 0.1},
                               storage, run, str(export), steps=STEPS)
    assert {"eval/auc", "eval/accuracy", "eval/loss"} <= set(serving[-1].metrics)
    assert serving[-1].metrics["eval/auc"] > 0.6, serving[-1].metrics

    x, y = census_rows(200, seed=99)
    for name, value in _UNSEEN.items():  # OOV strings reach the server too
        x[name][:5] = value
    served = tf.saved_model.load(str(export / str(STEPS))).signatures["serving_default"]
    got = {k: v.numpy() for k, v in served(**{
        k: tf.constant(v.astype(str) if v.dtype == object else v)
        for k, v in x.items()}).items()}
    prefix = os.path.join(RunLayout(storage, run).checkpoint_dir("serving", STEPS),
                          "model.ckpt")
    want = stock_predictions(prefix, x)
    assert set(got) == set(want)
    for name in ("logits", "probability"):
        assert np.allclose(got[name], want[name], rtol=1e-5, atol=1e-6), name
    np.testing.assert_array_equal(got["class_ids"], want["class_ids"])
    np.testing.assert_array_equal(got["classes"], want["classes"])
    assert set(np.unique(got["classes"])) == {b">50K", b"<=50K"}
    assert np.mean(got["class_ids"][:, 0] == y) > 0.6
