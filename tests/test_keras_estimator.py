"""Models people already have: a ``tf_keras`` convnet with batch norm, and
``tf.estimator``-style model functions through :func:`from_estimator`.

Everything but the last test runs in-process on the framework's own graph
builder (``build_train_graph``, ``predict_reads``) and restore job, with real
TF and no Ray. ``tf_keras`` needs no ``TF_USE_LEGACY_KERAS`` here: the model
imports it directly, so it works after other modules imported TensorFlow.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from distributed import config as config_lib
from distributed.checkpoint import RunLayout
from distributed.checkpoint.selection import (MissingInferenceVariablesWarning,
                                              SelectionSpec, describe_variables,
                                              select)
from distributed.errors import ConfigError
from distributed.model.estimator import (EstimatorSpec, IgnoredTrainOpWarning, ModeKeys,
                                   from_estimator, to_estimator_mode)
from distributed.examples import digits, keras_digits
from distributed.model import EVAL, PREDICT, TRAIN, ModelSpec, load_function
from distributed.model.graphs import call_model_fn
from distributed.train.graph import (InputSpec, VariableLoader, build_train_graph,
                                     predict_reads)
from tests.helpers.drivers import prepare

KERAS = "distributed.examples.keras_digits:keras_cnn_model_fn"
ESTIMATOR = "tests.test_keras_estimator:adapted_mlp_model_fn"
KERAS_TRAINABLE = {f"keras_cnn/conv_{i}/kernel" for i in (0, 1)} | {
    f"keras_cnn/bn_{i}/{v}" for i in (0, 1) for v in ("gamma", "beta")} | {
    "keras_cnn/logits/kernel", "keras_cnn/logits/bias"}
KERAS_BN_STATS = {f"keras_cnn/bn_{i}/{v}" for i in (0, 1)
                  for v in ("moving_mean", "moving_variance")}
STEPS = 100
BATCH = 64


# ------------------------------------------------ an Estimator-style model --

def _dense(x, units, name):
    with tf.compat.v1.variable_scope(name):
        kernel = tf.compat.v1.get_variable(
            "kernel", [int(x.shape[-1]), units],
            initializer=tf.compat.v1.glorot_uniform_initializer(seed=1))
        bias = tf.compat.v1.get_variable("bias", [units],
                                         initializer=tf.compat.v1.zeros_initializer())
    return tf.nn.bias_add(tf.matmul(x, kernel), bias)


def estimator_mlp_model_fn(features, labels, mode, params):
    """Written for tf.estimator: ModeKeys, EstimatorSpec and its own train_op."""
    with tf.compat.v1.variable_scope("est_mlp", reuse=tf.compat.v1.AUTO_REUSE):
        hidden = tf.nn.relu(_dense(features["image"], params.get("hidden", 32), "hidden"))
        logits = _dense(hidden, 10, "logits")
    predictions = {"classes": tf.argmax(logits, axis=-1), "logits": logits}
    if mode == ModeKeys.PREDICT:
        return EstimatorSpec(mode, predictions=predictions)
    loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, logits)
    train_op = None
    if mode == ModeKeys.TRAIN:
        train_op = tf.compat.v1.train.AdamOptimizer(0.1).minimize(
            loss, global_step=tf.compat.v1.train.get_global_step())
    return EstimatorSpec(mode, predictions=predictions, loss=loss, train_op=train_op)


adapted_mlp_model_fn = from_estimator(estimator_mlp_model_fn)
EST_TRAINABLE = {f"est_mlp/{layer}/{v}" for layer in ("hidden", "logits")
                 for v in ("kernel", "bias")}


# ------------------------------------------------------------- helpers -----

def make_config(model=KERAS, **overrides):
    data = {"model": model, "workers": 1, "batch_size": BATCH,
            "optimizer": {"name": "adam", "learning_rate": 0.01}}
    data.update(overrides)
    return config_lib.from_dict(data)


def input_spec():
    features, labels = next(digits.digits_input_fn(0, 1, BATCH, {}))
    return InputSpec.from_batch(features, labels, "digits")


def train(tg, sess, steps):
    batches = digits.digits_input_fn(0, 1, BATCH, {})
    losses = []
    for _ in range(steps):
        x, y = next(batches)
        loss, _ = sess.run([tg.loss, tg.train_op],
                           {tg.features["image"]: x["image"], tg.labels: y})
        losses.append(loss)
    return np.array(losses)


def predict_graph(config, values=None):
    """A fresh predict graph of ``config``'s model, optionally loaded with
    ``values`` by name; returns ``(session, image placeholder, predictions)``."""
    graph = tf.Graph()
    with graph.as_default():
        features, _ = input_spec().placeholders()
        spec = call_model_fn(config, features, None, PREDICT)
        variables = tf.compat.v1.global_variables()
        init = tf.compat.v1.global_variables_initializer()
        loader = VariableLoader(variables) if values else None
    sess = tf.compat.v1.Session(graph=graph)
    sess.run(init)
    if values:
        # Matched by name, like the restore job: every name must exist on both sides.
        assert {v.op.name for v in variables} == set(values)
        loader.load(sess, values)
    return sess, features["image"], spec.predictions


def accuracy(sess, image, predictions):
    x, y = digits.digits_eval_arrays("test")
    return float(np.mean(sess.run(predictions["classes"], {image: x["image"]}) == y))


@pytest.fixture(scope="module")
def keras_trained():
    """The Keras model's framework train graph, trained ``STEPS`` steps."""
    config = make_config()
    tg = build_train_graph(config, input_spec())
    sess = tf.compat.v1.Session(graph=tg.graph)
    sess.run(tg.init_op)
    stats = {v.op.name: v for v in tg.model_state}
    initial = sess.run(stats)
    losses = train(tg, sess, STEPS)
    yield config, tg, sess, losses, initial, sess.run(stats)
    sess.close()


# ----------------------------------------------------------- Keras model ---

def test_keras_train_graph_trains_and_updates_bn_statistics(keras_trained):
    _, tg, sess, losses, initial, trained = keras_trained
    with tg.graph.as_default():
        trainable = {v.op.name for v in tf.compat.v1.trainable_variables()}
    assert trainable == KERAS_TRAINABLE
    assert KERAS_TRAINABLE | KERAS_BN_STATS <= {v.op.name for v in tg.variables}
    # The moving statistics are the model state the framework averages each step.
    assert {v.op.name for v in tg.model_state} == KERAS_BN_STATS
    assert losses[-10:].mean() < 0.3 * losses[:3].mean()
    assert sess.run(tg.global_step) == STEPS
    for name in KERAS_BN_STATS:
        assert not np.allclose(trained[name], initial[name]), name
        assert np.allclose(initial[name], 0.0 if "mean" in name else 1.0)


@pytest.mark.parametrize("mode", [TRAIN, EVAL, PREDICT])
def test_keras_names_match_across_modes_and_updates_only_in_train(mode):
    graph = tf.Graph()
    with graph.as_default():
        features, labels = input_spec().placeholders()
        # An unnamed Keras layer built first does not shift the model's names.
        tf_keras.layers.Dense(3)(features["image"])
        spec = keras_digits.keras_cnn_model_fn(
            features, None if mode == PREDICT else labels, mode, {})
        names = {v.op.name for v in tf.compat.v1.global_variables()}
        trainable = {v.op.name for v in tf.compat.v1.trainable_variables()}
        updates = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
    assert names - {"dense/kernel", "dense/bias"} == KERAS_TRAINABLE | KERAS_BN_STATS
    assert trainable - {"dense/kernel", "dense/bias"} == KERAS_TRAINABLE
    assert len(updates) == (4 if mode == TRAIN else 0)
    assert set(spec.predictions) == {"logits", "probabilities", "classes"}
    assert (spec.loss is None) == (mode == PREDICT)


def test_inference_selection_keeps_keras_bn_statistics(keras_trained):
    config, tg, *_ = keras_trained
    reads = predict_reads(config, input_spec())
    assert reads == KERAS_TRAINABLE | KERAS_BN_STATS
    infos = describe_variables(tg.variables)
    chosen = select(infos, SelectionSpec("inference"), reads)
    assert set(chosen.names) == KERAS_TRAINABLE | KERAS_BN_STATS
    with pytest.warns(MissingInferenceVariablesWarning) as caught:
        trainable_only = select(infos, SelectionSpec("trainable"), reads)
    assert set(trainable_only.names) == KERAS_TRAINABLE
    assert all(name in str(caught[0].message) for name in KERAS_BN_STATS)


def test_fresh_predict_graph_serves_the_trained_moving_statistics(keras_trained):
    config, tg, sess, *_ = keras_trained
    values = sess.run({v.op.name: v for v in tg.variables
                       if v.op.name in KERAS_TRAINABLE | KERAS_BN_STATS})
    served, image, predictions = predict_graph(config, values)
    with served:
        assert accuracy(served, image, predictions) > 0.85
        feed = {image: digits.digits_eval_arrays("test")[0]["image"][:50]}
        before = served.run(predictions["logits"], feed)
        mean = next(v for v in served.graph.get_collection("variables")
                    if v.op.name == "keras_cnn/bn_0/moving_mean")
        mean.load(values["keras_cnn/bn_0/moving_mean"] + 1.0, served)
        assert not np.allclose(served.run(predictions["logits"], feed), before)


def test_restore_job_exports_the_keras_model(storage, tmp_path):
    from distributed.serving import job
    from distributed.train.coordinator import Coordinator
    cfg = make_config(storage=storage, run="keras", steps=40,
                      selection={"policy": "inference"})
    coord = Coordinator(cfg.to_dict())
    prepare(coord)
    try:
        assert set(coord.serving_names) == KERAS_TRAINABLE | KERAS_BN_STATS
        assert not coord.warnings
        train(coord.tg, coord.sess, 40)
        by_name = {v.op.name: v for v in coord.tg.variables}
        values = coord.sess.run({n: by_name[n] for n in coord.serving_names})
        coord.save(40, "serving", values, {"loss": 0.0})
    finally:
        coord.sess.close()
    result = job.restore_once(storage, "keras", str(tmp_path / "export"),
                              echo=lambda s: None)
    images = digits.digits_eval_arrays("test")[0]["image"][:50]
    served = tf.saved_model.load(result.export_dir).signatures["serving_default"]
    got = served(image=tf.constant(images))["logits"].numpy()
    sess, image, predictions = predict_graph(cfg, values)
    with sess:
        want = sess.run(predictions["logits"], {image: images})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def forgetful_keras_model_fn(features, labels, mode, params):
    """The Keras CNN without its batch-norm updates in ``UPDATE_OPS``: the
    mistake that leaves the moving statistics at their initial values."""
    model = keras_digits._build_cnn(tf_keras, params or {})
    logits = model(features["image"], training=mode == TRAIN)
    if mode == PREDICT:
        return ModelSpec(predictions={"logits": logits})
    loss = tf.reduce_mean(tf_keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))
    return ModelSpec(loss=loss, predictions={"logits": logits})


def test_moving_statistics_nothing_updates_are_a_warning_naming_the_fix(storage):
    from distributed.train.coordinator import Coordinator
    cfg = make_config(model=f"{__name__}:forgetful_keras_model_fn", storage=storage,
                      run="forgetful", selection={"policy": "inference"})
    coord = Coordinator(cfg.to_dict())
    prepare(coord)
    coord.sess.close()
    (warning,) = [w for w in coord.warnings if "UPDATE_OPS" in w]
    for name in KERAS_BN_STATS:
        assert name in warning
    assert "distributed.model.keras.add_model_updates" in warning and "initial values" in warning


def test_l2_param_adds_keras_regularization_losses():
    def initial_loss(l2):
        graph = tf.Graph()
        with graph.as_default():
            features, labels = input_spec().placeholders()
            spec = keras_digits.keras_cnn_model_fn(features, labels, TRAIN, {"l2": l2})
            with tf.compat.v1.Session() as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                x, y = next(digits.digits_input_fn(0, 1, BATCH, {}))
                return sess.run(spec.loss, {features["image"]: x["image"], labels: y})

    assert initial_loss(1.0) > initial_loss(0.0) + 1.0


UNSEEDED_KERAS = "tests.test_keras_estimator:unseeded_keras_model_fn"


def unseeded_keras_model_fn(features, labels, mode, params):
    """Keras layers as most code builds them: no initializer seeds."""
    x = tf_keras.layers.Flatten()(features["image"])
    x = tf_keras.layers.Dense(16, activation="relu")(x)
    logits = tf_keras.layers.Dropout(0.1)(tf_keras.layers.Dense(10)(x),
                                          training=mode == TRAIN)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits)) if labels is not None else None
    return ModelSpec(loss=loss, predictions={"logits": logits})


def test_seed_makes_keras_initial_weights_the_same_and_leaves_random_alone():
    """Keras draws an unseeded initializer's seed from Python's ``random``:
    the run's ``seed`` seeds Keras' own generator instead, so two builds with
    one seed start alike (here in one process, where ``random`` has moved on
    between them) and another seed differs; the user's ``random`` state is
    left as it was."""
    import random

    def initial_weights(seed):
        graph = tf.Graph()
        with graph.as_default():
            features, labels = input_spec().placeholders()
            call_model_fn(make_config(UNSEEDED_KERAS, seed=seed), features, labels, TRAIN)
            with tf.compat.v1.Session() as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                return {v.op.name: sess.run(v)
                        for v in tf.compat.v1.trainable_variables()}

    state = random.getstate()
    first = initial_weights(0)
    assert random.getstate() == state
    random.random()
    again, other = initial_weights(0), initial_weights(1)
    assert set(first) == set(again) and len(first) >= 4
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    assert any(not np.array_equal(first[n], other[n]) for n in first
               if first[n].std() > 0)


def test_missing_tf_keras_is_a_config_error_naming_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tf_keras", None)  # import raises ImportError
    with tf.Graph().as_default():
        features, labels = input_spec().placeholders()
        with pytest.raises(ConfigError, match=r"pip install 'tf_keras==\d+\.\d+\.\*'"):
            call_model_fn(make_config(), features, labels, TRAIN)


# ----------------------------------------------------- Estimator adapter ---

def test_modes_map_to_estimator_mode_keys_and_args_follow_the_signature():
    seen = []

    def three_args(features, labels, mode):
        seen.append((labels, mode))
        return EstimatorSpec(mode, predictions=features["x"], loss=features["x"])

    def with_config(features, mode, params, config):
        seen.append((mode, params, config))
        return EstimatorSpec(mode, predictions={"y": features["x"]})

    def with_kwargs(features, **kwargs):
        seen.append(sorted(kwargs))
        return EstimatorSpec(kwargs["mode"], predictions={"y": features["x"]})

    assert [to_estimator_mode(m) for m in (TRAIN, EVAL, PREDICT)] == [
        "train", "eval", "infer"]
    with pytest.raises(ValueError, match="mode"):
        to_estimator_mode("infer")
    with tf.Graph().as_default():
        x = tf.constant([1.0])
        for mode in (TRAIN, EVAL, PREDICT):
            spec = from_estimator(three_args)({"x": x}, "labels", mode, {})
            assert isinstance(spec, ModelSpec) and spec.predictions == {"output": x}
        from_estimator(with_config)({"x": x}, "labels", PREDICT, {"a": 1})
        from_estimator(with_kwargs)({"x": x}, None, TRAIN, None)
        # As in an Estimator, the global step exists before the model_fn runs.
        assert tf.compat.v1.train.get_global_step() is not None
    assert seen == [("labels", "train"), ("labels", "eval"), ("labels", "infer"),
                    ("infer", {"a": 1}, None), ["config", "labels", "mode", "params"]]
    # The framework's arity check sees the four-argument contract.
    adapted = load_function(ESTIMATOR, "model", 4)
    assert list(inspect.signature(adapted).parameters) == [
        "features", "labels", "mode", "params"]


def test_spec_conversion_keeps_loss_predictions_and_eval_metric_ops():
    with tf.Graph().as_default():
        x = tf.constant([1.0])
        convert = from_estimator(lambda features, labels, mode: features)
        assert convert(EstimatorSpec("infer", predictions=None), None, PREDICT,
                       {}).predictions == {}
        spec = convert(EstimatorSpec("eval", loss=x, predictions={"p": x},
                                     eval_metric_ops={"acc": x}), 0, EVAL, {})
        assert spec == ModelSpec(loss=x, predictions={"p": x}, eval_metrics={"acc": x})
        same = ModelSpec(loss=x)
        assert convert(same, 0, TRAIN, {}) is same
        with pytest.raises(ConfigError, match="no .loss and .predictions"):
            convert({"loss": x}, 0, TRAIN, {})


def test_ignored_train_op_warns_once_per_adapted_function():
    adapted = from_estimator(estimator_mlp_model_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with tf.Graph().as_default():
                features, labels = input_spec().placeholders()
                adapted(features, labels, TRAIN, {})
    ours = [w for w in caught if issubclass(w.category, IgnoredTrainOpWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "estimator_mlp_model_fn returned train_op, which the framework ignores" in message
    assert "The 10 variable(s) only it uses" in message
    assert ours[0].filename == __file__  # points at the caller of the adapted function


def test_adapted_estimator_model_trains_with_the_framework_optimizer():
    config = make_config(ESTIMATOR, optimizer={"name": "adam", "learning_rate": 0.01})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredTrainOpWarning)
        tg = build_train_graph(config, input_spec())
    with tf.compat.v1.Session(graph=tg.graph) as sess:
        sess.run(tg.init_op)
        losses = train(tg, sess, 60)
        # The model_fn's own train_op (which also steps global_step) never ran.
        assert sess.run(tg.global_step) == 60
    assert losses[-10:].mean() < 0.5 * losses[:3].mean()
    reads = predict_reads(config, input_spec())
    chosen = select(describe_variables(tg.variables), SelectionSpec("inference"), reads)
    assert set(chosen.names) == EST_TRAINABLE
    # The model_fn's own Adam state is out of the variables: only ours is there.
    names = {v.op.name for v in tg.variables}
    assert names == EST_TRAINABLE | {"global_step", "beta1_power_1", "beta2_power_1"} | {
        f"{n}/Adam_{i}" for n in EST_TRAINABLE for i in (2, 3)}


# ------------------------------------------------------------ end to end ---

@pytest.mark.slow
@pytest.mark.ray
def test_keras_model_trains_on_local_ray_and_serves(local_ray, storage, tmp_path):
    from distributed.serving import job
    from distributed.train import trainer

    config = make_config(storage=storage, run="keras-ray", steps=30, workers=2,
                         batch_size=32, cpus_per_worker=0.5, log_every=10,
                         selection={"policy": "inference"},
                         checkpoint={"serving_every": 30, "full_every": 30},
                         collective_timeout=60.0)
    lines: list[str] = []
    summary = trainer.train(config, echo=lines.append)
    assert summary["steps"] == 30
    losses = [float(m.group(1)) for m in
              (re.match(r"step \d+/\d+\s+mean loss (\S+)", line) for line in lines) if m]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], lines
    assert not [line for line in lines if line.startswith("WARNING")], lines
    prefix = os.path.join(RunLayout(storage, "keras-ray").checkpoint_dir("serving", 30),
                          "model.ckpt")
    assert {n for n, _ in tf.train.list_variables(prefix)} == (
        KERAS_TRAINABLE | KERAS_BN_STATS)
    reader = tf.train.load_checkpoint(prefix)
    assert np.abs(reader.get_tensor("keras_cnn/bn_0/moving_mean")).max() > 1e-3
    result = job.restore_once(storage, "keras-ray", str(tmp_path / "export"),
                              echo=lambda s: None)
    # The SavedModel computes what a fresh predict graph loaded by name from the
    # checkpoint computes; 30 steps already beat chance (0.1) by far.
    x, y = digits.digits_eval_arrays("test")
    served = tf.saved_model.load(result.export_dir).signatures["serving_default"]
    got = served(image=tf.constant(x["image"]))["logits"].numpy()
    values = {n: reader.get_tensor(n) for n in KERAS_TRAINABLE | KERAS_BN_STATS}
    sess, image, predictions = predict_graph(config, values)
    with sess:
        want = sess.run(predictions["logits"], {image: x["image"]})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.mean(np.argmax(got, axis=-1) == y) > 0.3
