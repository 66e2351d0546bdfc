"""Functional Keras models: a ``tf_keras.applications`` network in the framework.

A functional model's ``model.updates`` also hold the batch-norm updates its
layers built on the model's own ``Input`` placeholders; the framework must run
only those of the call on ``features`` (``distributed.model.keras``, and the filter in
``build_train_graph``), and a train step that needs a placeholder nobody feeds
is one ``ConfigError`` at graph build time. The unit tests build graphs
in-process; the last test trains MobileNet (width 0.25, 32x32) on 2 workers on
a real local Ray, restores and serves it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from distributed import config as config_lib  # noqa: E402
from distributed.checkpoint import RunLayout  # noqa: E402
from distributed.errors import ConfigError  # noqa: E402
from distributed.examples import keras_app, keras_digits  # noqa: E402
from distributed.model.keras import model_losses, model_updates  # noqa: E402
from distributed.model import PREDICT, TRAIN, ModelSpec  # noqa: E402
from distributed.model.graphs import call_model_fn  # noqa: E402
from distributed.train.graph import (InputSpec, VariableLoader,  # noqa: E402
                                     build_train_graph)

APP = "distributed.examples.keras_app:app_model_fn"
BATCH = 16
BN_LAYERS = ["conv1_bn"] + [f"conv_{kind}_{i}_bn" for i in range(1, 14)
                            for kind in ("dw", "pw")]
BN_STATS = {f"{layer}/{stat}" for layer in BN_LAYERS
            for stat in ("moving_mean", "moving_variance")}


def make_config(model=APP, **overrides):
    data = {"model": model, "input": "distributed.examples.keras_app:app_input_fn",
            "workers": 1, "batch_size": BATCH,
            "optimizer": {"name": "adam", "learning_rate": 0.001}}
    data.update(overrides)
    return config_lib.from_dict(data)


def input_spec():
    features, labels = next(keras_app.app_input_fn(0, 1, BATCH, {}))
    return InputSpec.from_batch(features, labels, "app")


def old_recipe_model_fn(features, labels, mode, params):
    """The app model with all of ``model.updates`` in ``UPDATE_OPS`` (the recipe
    that crashed with ``You must feed a value for placeholder tensor``)."""
    model = keras_app._build_app(tf_keras, params or {})
    logits = model(features["image"], training=mode == TRAIN)
    for op in model.updates:
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.UPDATE_OPS, op)
    if mode == PREDICT:
        return ModelSpec(predictions={"logits": logits})
    loss = tf.reduce_mean(tf_keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))
    return ModelSpec(loss=loss, predictions={"logits": logits})


def unfed_placeholder_model_fn(features, labels, mode, params):
    """A loss scaled by a placeholder of the model's own, which nothing feeds."""
    scale = tf.compat.v1.placeholder(tf.float32, [], name="loss_scale")
    flat = tf.reshape(features["image"], [-1, 32 * 32 * 3])
    logits = tf_keras.layers.Dense(10, name="head")(flat)
    loss = scale * tf.reduce_mean(tf_keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))
    return ModelSpec(loss=loss, predictions={"logits": logits})


def step(tg, sess, batches):
    x, y = next(batches)
    return sess.run([tg.loss, tg.train_op],
                    {tg.features["image"]: x["image"], tg.labels: y})[0]


# ------------------------------------------------------------ unit tests ---

def test_model_updates_keep_only_the_calls_updates():
    with tf.Graph().as_default():
        features, _ = input_spec().placeholders()
        model = keras_app._build_app(tf_keras, {})
        model(features["image"], training=True)
        everything = model.updates
        ours = model_updates(model, features["image"])
        # Built on the application's Input, on the app's Input, and on features.
        assert len(everything) == 3 * len(ours) == 3 * len(BN_STATS)
        assert {op.inputs[0].op.name for op in ours} == BN_STATS
        assert model_losses(model, features["image"]) == []


def test_sequential_model_updates_and_losses_are_all_of_its_own():
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 64], name="x")
        model = keras_digits._build_cnn(tf_keras, {"l2": 0.1})
        model(x, training=True)
        assert model_updates(model, x) == model.updates and len(model.updates) == 4
        assert len(model_losses(model, x)) == len(model.losses) == 3


def test_framework_drops_functional_updates_on_keras_inputs_and_trains():
    tg = build_train_graph(make_config(f"{__name__}:old_recipe_model_fn"), input_spec())
    assert {v.op.name for v in tg.model_state} == BN_STATS
    with tf.compat.v1.Session(graph=tg.graph) as sess:
        sess.run(tg.init_op)
        before = sess.run({v.op.name: v for v in tg.model_state})
        batches = keras_app.app_input_fn(0, 1, BATCH, {})
        for _ in range(2):
            step(tg, sess, batches)  # feeds only the input's placeholders
        after = sess.run({v.op.name: v for v in tg.model_state})
    assert not np.allclose(after["conv1_bn/moving_mean"], before["conv1_bn/moving_mean"])


def test_unfed_placeholder_is_one_config_error_naming_it_and_the_fix(storage):
    from distributed.train.coordinator import Coordinator
    cfg = make_config(f"{__name__}:unfed_placeholder_model_fn", storage=storage,
                      run="unfed")
    with pytest.raises(ConfigError) as caught:
        build_train_graph(cfg, input_spec())
    message = str(caught.value)
    assert "\n" not in message
    assert "'loss_scale' (float32 ())" in message
    assert "input/image, input/labels" in message
    assert "placeholder_with_default" in message
    assert "distributed.model.keras.add_model_updates" in message
    # The coordinator builds this graph before it writes anything.
    with pytest.raises(ConfigError, match="loss_scale"):
        Coordinator(cfg.to_dict()).build()
    assert not [f for _, _, files in os.walk(storage) for f in files]


# ------------------------------------------------------------ end to end ---

def predict_logits(config, values, images):
    """Logits of a fresh predict graph of ``config``'s model loaded by name."""
    graph = tf.Graph()
    with graph.as_default():
        features, _ = input_spec().placeholders()
        spec = call_model_fn(config, features, None, PREDICT)
        variables = tf.compat.v1.global_variables()
        loader = VariableLoader(variables)
    assert {v.op.name for v in variables} == set(values)
    with tf.compat.v1.Session(graph=graph) as sess:
        loader.load(sess, values)
        return sess.run(spec.predictions["logits"], {features["image"]: images})


@pytest.mark.slow
@pytest.mark.ray
def test_keras_application_trains_on_two_workers_restores_and_serves(local_ray, storage,
                                                                     tmp_path):
    from distributed.serving import job
    from distributed.train import trainer

    steps = 10
    config = make_config(storage=storage, run="app-ray", steps=steps, workers=2,
                         cpus_per_worker=0.5, log_every=5,
                         selection={"policy": "inference"},
                         checkpoint={"serving_every": steps, "full_every": steps},
                         collective_timeout=120.0)
    lines: list[str] = []
    summary = trainer.train(config, echo=lines.append)
    assert summary["steps"] == steps
    assert not [line for line in lines if line.startswith("WARNING")], lines
    prefix = os.path.join(RunLayout(storage, "app-ray").checkpoint_dir("serving", steps),
                          "model.ckpt")
    names = {n for n, _ in tf.train.list_variables(prefix)}
    assert BN_STATS <= names and "logits/kernel" in names
    assert not [n for n in names if "Adam" in n or n == "global_step"]
    reader = tf.train.load_checkpoint(prefix)
    values = {n: reader.get_tensor(n) for n in names}
    for name in BN_STATS:  # initial values: mean 0, variance 1
        initial = 0.0 if name.endswith("moving_mean") else 1.0
        assert not np.allclose(values[name], initial), name
    result = job.restore_once(storage, "app-ray", str(tmp_path / "export"),
                              echo=lambda s: None)
    images = keras_app.app_arrays("test")[0]["image"][:64]
    served = tf.saved_model.load(result.export_dir).signatures["serving_default"]
    got = served(image=tf.constant(images))["logits"].numpy()
    want = predict_logits(config, values, images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Serving reads the trained moving statistics: the initial ones give others.
    fresh = dict(values)
    for name in BN_STATS:
        fresh[name] = np.full_like(values[name],
                                   0.0 if name.endswith("moving_mean") else 1.0)
    assert not np.allclose(predict_logits(config, fresh, images), got, atol=1e-3)
