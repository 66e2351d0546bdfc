"""``optimizer.ema_decay`` and ``selection.serve_ema``: moving averages of the
trainable variables, updated by the train op, served under the model's names.

The unit tests build the real training graph (no Ray) and check the averages
against the closed-form EMA recursion; the coordinator's own save path writes
serving checkpoints that the restore job exports and stock
``tf.saved_model.load`` serves. The Ray tests (2 workers, few steps) check
that replicas stay identical, that a serving checkpoint holds the full
checkpoint's averages under the model's names, and that resume restores them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import read_manifest
from distributed.checkpoint.selection import SelectionSpec, checkpoint_sources
from distributed.errors import ConfigError, SelectionError
from distributed.examples.digits import digits_eval_arrays
from distributed.inputs.spec import InputSpec
from distributed.model import PREDICT
from distributed.model.graphs import call_model_fn
from distributed.serving import job
from distributed.train.coordinator import Coordinator
from distributed.train.graph import build_train_graph
from tests.helpers import drivers
from tests.helpers.drivers import actor_group, prepare
from tests.helpers.training import ckpt_prefix, make_config, run_train

HERE = "tests.test_ema"
MLP = "distributed.examples.digits:mlp_model_fn"
EMA = "/ExponentialMovingAverage"
MLP_TRAINABLE = {f"mlp/{layer}/{name}" for layer in ("dense_0", "logits")
                 for name in ("kernel", "bias")}


def quadratic_model_fn(features, labels, mode, params):
    from distributed.model import ModelSpec
    x = tf.compat.v1.get_variable("x", initializer=tf.constant([3.0, -4.0]))
    return ModelSpec(loss=tf.reduce_sum(tf.square(x)) + 0.0 * tf.reduce_sum(
        features["a"]), predictions={"x": x})


def quadratic_graph(optimizer: dict):
    config = config_lib.from_dict({"model": f"{HERE}:quadratic_model_fn",
                                   "optimizer": optimizer})
    return build_train_graph(config, InputSpec({"a": ("float32", (1,))}, ("int64", ())))


# ------------------------------------------------------------- the graph -----

@pytest.mark.parametrize("num_updates", [False, True], ids=["decay", "num-updates"])
def test_train_op_moves_the_averages_by_the_ema_formula(num_updates):
    """SGD (lr 0.1) on sum(x^2) scales x by 0.8 a step; after each step's
    update the average moves to d * average + (1 - d) * x, with d = 0.5, or
    min(0.5, (1 + k) / (10 + k)) at global step k with the step as num_updates."""
    tg = quadratic_graph({"name": "sgd", "learning_rate": 0.1, "ema_decay": 0.5,
                          "ema_num_updates": num_updates})
    assert tg.averages == {"x": "x" + EMA}
    by_name = {v.op.name: v for v in tg.variables}
    shadow = by_name["x" + EMA]
    assert "x" + EMA not in {v.op.name for v in
                             tg.graph.get_collection("trainable_variables")}
    feed = {tg.features["a"]: np.zeros((1, 1), np.float32), tg.labels: [0]}
    x = want = np.array([3.0, -4.0])
    with tf.compat.v1.Session(graph=tg.graph) as sess:
        sess.run(tg.init_op)
        np.testing.assert_allclose(sess.run(shadow), want)  # starts at the variable
        for k in range(1, 5):
            sess.run(tg.train_op, feed)
            x = 0.8 * x
            d = min(0.5, (1 + k) / (10 + k)) if num_updates else 0.5
            want = d * want + (1 - d) * x
            np.testing.assert_allclose(sess.run(shadow), want, rtol=1e-6,
                                       err_msg=f"step {k}")
            np.testing.assert_allclose(sess.run(by_name["x"]), x, rtol=1e-6)


def test_no_averages_without_ema_decay():
    tg = quadratic_graph({"name": "sgd", "learning_rate": 0.1})
    assert tg.averages == {}
    assert not [v for v in tg.variables if EMA in v.op.name]


# ------------------------------------------------------------ bad config -----

BAD = [
    ("decay-one", {"optimizer": {"ema_decay": 1.0}},
     r"^optimizer\.ema_decay: expected a number between 0 and 1 \(exclusive\), such "
     r"as 0\.999, got 1\.0$"),
    ("decay-zero", {"optimizer": {"ema_decay": 0}}, r"^optimizer\.ema_decay: expected "
     r"a number between 0 and 1"),
    ("decay-negative", {"optimizer": {"ema_decay": -0.5}}, r"^optimizer\.ema_decay: "
     r"expected a number between 0 and 1 .*got -0\.5$"),
    ("decay-string", {"optimizer": {"ema_decay": "high"}},
     r"^optimizer\.ema_decay: expected a number, got 'high'"),
    ("num-updates-alone", {"optimizer": {"ema_num_updates": True}},
     r"^optimizer\.ema_num_updates: needs optimizer\.ema_decay"),
    ("serve-ema-alone", {"selection": {"policy": "inference", "serve_ema": True}},
     r"^selection\.serve_ema: needs optimizer\.ema_decay \(e\.g\. 0\.999\)"),
    ("serve-ema-not-bool", {"optimizer": {"ema_decay": 0.9},
                            "selection": {"serve_ema": "yes"}},
     r"^selection\.serve_ema: expected true or false, got 'yes'$"),
]


@pytest.mark.parametrize("data,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_ema_configs_are_one_clear_line(data, match):
    with pytest.raises((ConfigError, SelectionError), match=match) as caught:
        config_lib.from_dict(data)
    assert "\n" not in str(caught.value)


def test_ema_config_round_trips_and_older_records_are_unchanged():
    data = {"name": "adam", "learning_rate": 0.01, "clip_global_norm": None,
            "ema_decay": 0.99, "ema_num_updates": True}
    config = config_lib.from_dict({"optimizer": data,
                                   "selection": {"policy": "trainable",
                                                 "serve_ema": True}})
    assert config.to_dict()["optimizer"] == data
    assert config_lib.from_dict(config.to_dict()) == config
    assert json.loads(config.selection.to_json())["serve_ema"] is True
    assert "ema" not in json.dumps(config_lib.from_dict({}).to_dict()["optimizer"])
    assert "serve_ema" not in SelectionSpec().to_json()


def test_checkpoint_sources_map_selected_names_to_their_averages():
    averages = {"w": "w" + EMA, "b": "b" + EMA}
    names = ["w", "b", "bn/moving_mean"]
    assert checkpoint_sources(names, averages, False) == {n: n for n in names}
    assert checkpoint_sources(names, averages, True) == {
        "w": "w" + EMA, "b": "b" + EMA, "bn/moving_mean": "bn/moving_mean"}


# ------------------------------------- serving checkpoints and the export -----

def train_in_process(storage, run, serve_ema: bool, steps=(15, 30)):
    """Serving checkpoints at ``steps`` and a full one at the end, through the
    coordinator's real save path (no Ray)."""
    cfg = config_lib.from_dict({
        "model": MLP, "model_params": {"hidden": [16]}, "storage": storage,
        "run": run, "workers": 1, "steps": max(steps),
        "optimizer": {"name": "adam", "learning_rate": 0.01, "ema_decay": 0.8},
        "selection": {"policy": "inference", "serve_ema": serve_ema},
        "checkpoint": {"serving_every": 15, "full_every": 30}})
    return drivers.train_in_process(cfg, steps, full_at_end=True), cfg


def predict_with(cfg, values, images):
    """Predict-mode outputs with the model's variables set to ``values``."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 64])
        spec = call_model_fn(cfg, {"image": x}, None, PREDICT)
        with tf.compat.v1.Session() as sess:
            for v in tf.compat.v1.global_variables():
                v.load(values[v.op.name], sess)
            return sess.run(dict(spec.predictions), {x: images})


def test_serve_ema_checkpoint_holds_averages_under_model_names_and_exports(storage,
                                                                           tmp_path):
    coord, cfg = train_in_process(storage, "ema", serve_ema=True)
    assert sorted(coord.serving_names) == sorted(n + EMA for n in MLP_TRAINABLE)
    prefix = ckpt_prefix(storage, "ema", "serving", 30)
    serving = tf.train.load_checkpoint(prefix)
    full = tf.train.load_checkpoint(ckpt_prefix(storage, "ema", "full", 30))
    assert set(serving.get_variable_to_shape_map()) == MLP_TRAINABLE
    assert {n + EMA for n in MLP_TRAINABLE} <= set(full.get_variable_to_shape_map())
    for name in MLP_TRAINABLE:
        np.testing.assert_array_equal(serving.get_tensor(name),
                                      full.get_tensor(name + EMA), err_msg=name)
        assert not np.allclose(full.get_tensor(name), full.get_tensor(name + EMA))
    manifest = read_manifest(prefix.rsplit("/", 1)[0])
    rows = {r.name: r for r in manifest.tensors}
    assert set(rows) == MLP_TRAINABLE and all(r.trainable for r in rows.values())
    assert json.loads(manifest.metadata["selection"])["serve_ema"] is True

    # The restore job, unchanged, exports the averages; stock TF serves them.
    export = str(tmp_path / "export")
    result = job.restore_once(storage, "ema", export, echo=lambda s: None)
    images = digits_eval_arrays("test")[0]["image"][:50]
    fn = tf.saved_model.load(result.export_dir).signatures["serving_default"]
    got = {k: v.numpy() for k, v in fn(image=tf.constant(images)).items()}
    averaged = predict_with(cfg, {n: full.get_tensor(n + EMA) for n in MLP_TRAINABLE},
                            images)
    raw = predict_with(cfg, {n: full.get_tensor(n) for n in MLP_TRAINABLE}, images)
    np.testing.assert_allclose(got["logits"], averaged["logits"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got["logits"], raw["logits"], atol=1e-3)


def test_without_serve_ema_serving_holds_the_raw_values(storage):
    coord, _ = train_in_process(storage, "raw", serve_ema=False, steps=(15,))
    assert sorted(coord.serving_names) == sorted(MLP_TRAINABLE)
    serving = tf.train.load_checkpoint(ckpt_prefix(storage, "raw", "serving", 15))
    full = tf.train.load_checkpoint(ckpt_prefix(storage, "raw", "full", 15))
    for name in MLP_TRAINABLE:
        np.testing.assert_array_equal(serving.get_tensor(name), full.get_tensor(name))
    assert "serve_ema" not in coord.config.selection.to_json()


# ------------------------------------------------------------- real Ray -----

EMA_OPTIMIZER = {"name": "adam", "learning_rate": 0.01, "ema_decay": 0.9}


def ema_config(storage, run, steps, **overrides):
    data = {"model": MLP, "steps": steps, "optimizer": EMA_OPTIMIZER,
            "model_params": {"hidden": [16]},
            "selection": {"policy": "inference", "serve_ema": True},
            "checkpoint": {"serving_every": 10, "full_every": 20}, **overrides}
    return make_config(storage, run, **data)


@pytest.mark.slow
@pytest.mark.ray
def test_replicas_keep_identical_averages_that_serving_checkpoints_hold(local_ray,
                                                                        storage):
    """Drives the actors as ``train()`` does, to read every worker's variables."""
    config = ema_config(storage, "ema-replicas", 20)
    with actor_group(config) as (coordinator, workers, plan, _, initial):
        ray.get([w.train.remote(10) for w in workers])
        at10 = ray.get(workers[0].variables.remote())
        ray.get([w.train.remote(20) for w in workers])
        ray.get(workers[0].finish.remote())
        lead, other = ray.get([w.variables.remote() for w in workers])
    averages = {n + EMA for n in MLP_TRAINABLE}
    assert averages <= set(lead) == set(other) == set(initial)
    for name in lead:
        np.testing.assert_allclose(other[name], lead[name], rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    for name in MLP_TRAINABLE:  # the averages moved, and lag the variables
        assert not np.allclose(lead[name + EMA], initial[name + EMA]), name
        assert not np.allclose(lead[name + EMA], lead[name]), name
    # Each serving checkpoint holds rank 0's averages at its step under the
    # model's names: at 20 those the full checkpoint holds as .../ExponentialMovingAverage.
    full = tf.train.load_checkpoint(ckpt_prefix(storage, "ema-replicas", "full", 20))
    for step, values in ((10, at10), (20, lead)):
        serving = tf.train.load_checkpoint(
            ckpt_prefix(storage, "ema-replicas", "serving", step))
        assert set(serving.get_variable_to_shape_map()) == MLP_TRAINABLE
        for name in MLP_TRAINABLE:
            np.testing.assert_array_equal(serving.get_tensor(name), values[name + EMA],
                                          err_msg=f"{name} at step {step}")
            if step == 20:
                np.testing.assert_array_equal(serving.get_tensor(name),
                                              full.get_tensor(name + EMA), err_msg=name)


@pytest.mark.slow
@pytest.mark.ray
def test_resume_restores_the_averages(local_ray, storage):
    """The resumed coordinator (built as the trainer builds it) starts the
    workers from the full checkpoint's averages, not from the weights. (That
    the workers load the coordinator's values and a resumed run goes on is
    tested for every variable in tests/test_train.py.)"""
    checkpoint = {"serving_every": 10, "full_every": 10}
    run_train(ema_config(storage, "ema-resume", 10, checkpoint=checkpoint))
    full10 = tf.train.load_checkpoint(ckpt_prefix(storage, "ema-resume", "full", 10))
    second = ema_config(storage, "ema-resume", 20, checkpoint=checkpoint)
    coordinator = Coordinator(second.to_dict())
    try:
        assert prepare(coordinator).opened.resumed_from == 10
        values = coordinator.initial_values()
    finally:
        coordinator.sess.close()
    for name in MLP_TRAINABLE:
        np.testing.assert_array_equal(values[name + EMA], full10.get_tensor(name + EMA),
                                      err_msg=name)
        assert not np.allclose(values[name + EMA], values[name]), name
