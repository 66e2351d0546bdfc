"""Estimator's Scaffold semantics in every graph the framework runs.

Lookup tables (``TABLE_INITIALIZERS``: vocabulary feature columns), local
variables and an ``EstimatorSpec.scaffold`` (``init_fn``, ``local_init_op``)
run in training, in the ``steps_per_run`` loop, in evaluation, on resume and in
the exported SavedModel (its main op), which then serves raw strings.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.errors import ConfigError
from distributed.serving.job import restore_once
from distributed.train.coordinator import Coordinator
from distributed.train.graph import InputSpec, build_train_graph
from tests.helpers import scaffold_models as models
from tests.helpers.drivers import prepare

MODEL = "tests.helpers.scaffold_models:model_fn"
INPUT = "tests.helpers.scaffold_models:colors_input_fn"


def make_config(storage, run="colors", **fields):
    data = {"model": MODEL, "input": INPUT, "workers": 1, "batch_size": 16,
            "storage": str(storage), "run": run,
            "optimizer": {"name": "adam", "learning_rate": 0.05},
            "eval": {"input": INPUT, "batches": 4, "input_params": {"seed": 9}}}
    data.update(fields)
    return config_lib.from_dict(data)


def train(coord, steps):
    tg, batches = coord.tg, models.colors_input_fn(0, 1, 16, {})
    for _ in range(steps):
        features, labels = next(batches)
        feed = {tg.features[k]: v for k, v in features.items()}
        feed[tg.labels] = labels
        coord.sess.run(tg.train_op, feed)
    names = {v.op.name: v for v in tg.variables}
    return coord.sess.run({n: names[n] for n in coord.serving_names})


def load_saved_model(export_dir):
    graph = tf.Graph()
    sess = tf.compat.v1.Session(graph=graph)
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir)
    return sess, meta.signature_def["serving_default"]


def test_vocabulary_columns_train_evaluate_and_serve_raw_strings(tmp_path):
    coord = Coordinator(make_config(tmp_path).to_dict())
    prepare(coord)
    values = train(coord, 60)
    metrics, _ = coord.evaluator.evaluate(values)
    assert metrics["eval/accuracy"] > 0.75, metrics
    coord.save(60, "serving", values, {"loss": 0.0})
    coord.close()
    result = restore_once(str(tmp_path), "colors", str(tmp_path / "export"),
                          echo=lambda line: None)
    assert result.signature["inputs"] == {"color": "string [-1]", "x": "float32 [-1, 1]"}

    colors = np.array([b"red", b"green", b"blue", models.UNSEEN.encode(), b"never"],
                      dtype=object)
    x = np.zeros((5, 1), np.float32)
    sess, signature = load_saved_model(result.export_dir)
    served = sess.run(signature.outputs["logits"].name,
                      {signature.inputs["color"].name: colors,
                       signature.inputs["x"].name: x})
    tg = coord.tg
    expected = coord.sess.run(tg.graph.get_tensor_by_name("logits/BiasAdd:0"),
                              {tg.features["color"]: colors, tg.features["x"]: x})
    np.testing.assert_allclose(served, expected, rtol=1e-5)
    assert served[0, 1] > served[0, 0]  # red is always class 1: learned


def test_tables_work_inside_the_loop_of_steps_per_run(tmp_path):
    config = make_config(tmp_path)
    batches = models.colors_input_fn(0, 1, 16, {})
    runs = [next(batches) for _ in range(4)]
    tg = build_train_graph(config, InputSpec.from_batch(*runs[0], "test"),
                           steps_per_run=4)
    sess = tf.compat.v1.Session(graph=tg.graph)
    tg.initializers.run(sess)
    feed = {tg.graph.get_tensor_by_name(f"input/{k}:0"): np.stack([b[0][k] for b in runs])
            for k in runs[0][0]}
    feed[tg.graph.get_tensor_by_name("input/labels:0")] = np.stack([b[1] for b in runs])
    feed[tg.steps] = 4
    losses = sess.run([tg.train_op, tg.loss], feed)[1]
    assert len(losses) == 4 and np.all(np.isfinite(losses))


def marker_value(coord) -> float:
    (marker,) = [v for v in coord.tg.graph.get_collection(
        tf.compat.v1.GraphKeys.LOCAL_VARIABLES) if v.op.name == "marker"]
    return float(coord.sess.run(marker))


def test_scaffold_init_fn_on_a_fresh_start_only_and_local_init_op(tmp_path):
    params = {"model_params": {"scaffold": True},
              "checkpoint": {"serving_every": 5, "full_every": 5}}
    coord = Coordinator(make_config(tmp_path, **params).to_dict())
    prepare(coord)
    values = coord.initial_values()
    np.testing.assert_allclose(values["logits/bias"], [3.0, -3.0])  # init_fn ran
    assert marker_value(coord) == 7.0  # the scaffold's local_init_op ran
    names = {v.op.name: v for v in coord.tg.variables}
    with coord.tg.graph.as_default():
        coord.sess.run(tf.compat.v1.assign(names["logits/bias"], [1.0, 1.0]))
        coord.sess.run(tf.compat.v1.assign(coord.tg.global_step, 5))
    coord.save(5, "full", coord.sess.run(names), {})
    coord.close()
    resumed = Coordinator(make_config(tmp_path, **params).to_dict())
    plan = prepare(resumed)
    assert plan.opened.start_step == 5
    # Resumed values win over init_fn's warm start, as in Estimator.
    np.testing.assert_allclose(resumed.initial_values()["logits/bias"], [1.0, 1.0])
    assert marker_value(resumed) == 7.0


@pytest.mark.parametrize("size", [None, 3], ids=["column-counts-it", "size-given"])
def test_a_missing_vocabulary_file_is_one_line(tmp_path, size):
    missing = str(tmp_path / "colors.txt")
    config = make_config(tmp_path, model_params={"vocabulary_file": missing,
                                                 "vocabulary_size": size})
    spec = InputSpec.from_batch(*next(models.colors_input_fn(0, 1, 4, {})), "test")
    with pytest.raises(ConfigError) as raised:
        build_train_graph(config, spec)
    message = str(raised.value)
    assert "\n" not in message and "does not exist on node" in message, message
    assert (missing if size else "'color'") in message, message
    assert "same path on every node" in message
    with open(missing, "w") as f:
        f.write("\n".join(models.COLORS) + "\n")
    tg = build_train_graph(config, spec)
    with tf.compat.v1.Session(graph=tg.graph) as sess:
        tg.initializers.run(sess)
    assert os.path.exists(missing)
