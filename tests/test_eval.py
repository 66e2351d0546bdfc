"""Evaluation of serving checkpoints on the coordinator's side: metrics in the
catalog row, the best-by-eval export, bad eval config."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.errors import ConfigError
from distributed.examples import digits
from distributed.serving import job
from distributed.train.coordinator import Coordinator
from tests.helpers.drivers import prepare
from tests.helpers.training import make_config, run_train

MLP = "distributed.examples.digits:mlp_model_fn"
EVAL = {"input": "distributed.examples.digits:digits_eval_input_fn"}


def test_coordinator_commits_each_serving_checkpoint_with_its_eval_metrics(storage):
    """No Ray: the coordinator's real save path, values from its own training."""
    cfg = config_lib.from_dict({
        "model": MLP, "storage": storage, "run": "e", "workers": 1, "steps": 60,
        "model_params": {"hidden": [32]}, "checkpoint": {"serving_every": 30},
        "optimizer": {"name": "adam", "learning_rate": 0.01}, "eval": EVAL})
    coord = Coordinator(cfg.to_dict())
    prepare(coord)
    tg = coord.tg
    batches = digits.digits_input_fn(0, 1, 32, {})
    names = {v.op.name: v for v in tg.variables}
    for step in range(1, 61):
        f, l = next(batches)
        coord.sess.run(tg.train_op, {tg.features["image"]: f["image"], tg.labels: l})
        if step % 30 == 0:
            values = coord.sess.run({n: names[n] for n in coord.serving_names})
            result = coord.save(step, "serving", values, {"loss": 1.0})
            assert result.evaluating
    coord.close()
    events = coord.poll()
    entries = Catalog(RunLayout(storage, "e")).entries("serving")
    assert [e.step for e in entries] == [30, 60]
    # The metrics are those of the values handed over, computed independently.
    x, y = digits.digits_eval_arrays("test")
    graph = tf.Graph()
    with graph.as_default():
        image = tf.compat.v1.placeholder(tf.float32, [None, 64])
        spec = digits.mlp_model_fn({"image": image}, None, "predict", {"hidden": [32]})
        variables = tf.compat.v1.global_variables()
    with tf.compat.v1.Session(graph=graph) as sess:
        for v in variables:
            v.load(values[v.op.name], sess)
        accuracy = float(np.mean(sess.run(spec.predictions["classes"],
                                          {image: x["image"]}) == y))
    assert entries[-1].metrics["eval/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert entries[-1].metrics["loss"] == 1.0 and "eval/loss" in entries[-1].metrics
    assert [e.step for e in events if e.kind == "committed"] == [30, 60]


@pytest.mark.slow
@pytest.mark.ray
def test_digits_cnn_eval_accuracy_and_best_by_eval_export(local_ray, storage,  # noqa: F811
                                                           tmp_path):
    config = make_config(storage, "ev", steps=200, log_every=50,
                         checkpoint={"serving_every": 50, "full_every": 200},
                         retention={"serving": {"keep_best": {
                             "n": 1, "metric": "eval/accuracy", "mode": "max"}}},
                         eval=EVAL)
    summary, lines = run_train(config)
    assert any("eval/accuracy" in line for line in lines), lines
    entries = Catalog(RunLayout(storage, "ev")).entries("serving")
    scored = [e for e in entries if "eval/accuracy" in e.metrics]
    assert scored and max(e.metrics["eval/accuracy"] for e in scored) >= 0.9, entries
    result = job.restore_once(storage, "ev", str(tmp_path / "export"),
                              best="eval/accuracy:max", echo=lambda s: None)
    best = max(scored, key=lambda e: (e.metrics["eval/accuracy"], e.step))
    assert result.step == best.step
    x, y = digits.digits_eval_arrays("test")
    served = tf.saved_model.load(result.export_dir).signatures["serving_default"](
        image=tf.constant(x["image"]))
    assert float(np.mean(served["classes"].numpy() == y)) >= 0.9


@pytest.mark.parametrize("eval_block, message", [
    ({}, "eval.input: missing"),
    ({"input": "distributed.examples.digits:digits_eval_input_fn", "every": 30},
     "not a multiple of checkpoint.serving_every"),
    ({"input": "distributed.examples.digits:digits_eval_input_fn",
      "stop_when": {"metric": "accuracy"}}, "expected an eval metric"),
])
def test_bad_eval_config_is_one_line(storage, eval_block, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.from_dict({"storage": storage, "eval": eval_block,
                              "checkpoint": {"serving_every": 20}})


def test_keep_best_by_an_eval_metric_needs_an_eval_block_or_a_recorded_name(storage):
    with pytest.raises(ConfigError, match="only when the config has an eval block"):
        config_lib.from_dict({"storage": storage, "retention": {"serving": {
            "keep_best": {"metric": "eval/accuracy", "mode": "max"}}}})
    cfg = config_lib.from_dict({
        "model": MLP, "storage": storage, "run": "x", "eval": EVAL,
        "retention": {"serving": {"keep_best": {"metric": "eval/auc", "mode": "max"}}}})
    with pytest.raises(ConfigError, match="eval/auc is not recorded; evaluation "
                                          "records eval/accuracy, eval/loss"):
        Coordinator(cfg.to_dict()).build()


def test_early_stop_rule_counts_evaluations_without_a_new_best():
    from distributed.train.evaluation import EarlyStop
    rule = EarlyStop("eval/accuracy", "max", patience=2)
    said = [rule.observe(s, {"eval/accuracy": a})
            for s, a in [(10, 0.5), (20, 0.7), (30, 0.7), (40, 0.6), (50, 0.9)]]
    assert said[:3] == [None, None, None]
    assert "not improved for 2 evaluations (best 0.7000 at step 20" in said[3]
    assert rule.observe(60, {"other": 1.0}) is None  # the metric missing: no decision
    low = EarlyStop("eval/loss", "min", patience=1)
    assert low.observe(1, {"eval/loss": 1.0}) is None
    assert low.observe(2, {"eval/loss": 0.5}) is None
    assert low.observe(3, {"eval/loss": 0.6}) is not None


def test_a_resumed_run_goes_on_counting_evaluations_without_a_new_best(storage):
    """eval.stop_when's state is rebuilt from the committed rows' metrics when
    a coordinator resumes (a restarted group, or the same --run again)."""
    import pyarrow.parquet as pq

    from tests.helpers.drivers import train_in_process
    cfg = config_lib.from_dict({
        "model": MLP, "storage": storage, "run": "es", "workers": 1, "steps": 80,
        "model_params": {"hidden": [32]},
        "checkpoint": {"serving_every": 20, "full_every": 80},
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "eval": {**EVAL, "stop_when": {"metric": "eval/loss", "mode": "max",
                                       "patience": 9}}})
    first = train_in_process(cfg, (20, 40, 60, 80), full_at_end=True)
    first.close()
    rows = pq.read_table(RunLayout(storage, "es").catalog_dir).to_pylist()
    # (A checkpoint saved before the previous one was evaluated has no eval/loss.)
    losses = {r["step"]: dict(r["metrics"])["eval/loss"] for r in rows
              if r["tier"] == "serving" and "eval/loss" in dict(r["metrics"])}
    assert len(losses) >= 2 and 80 in losses, rows
    best_step = max(losses, key=losses.get)  # "max": the worst loss is the best
    second = Coordinator(cfg.to_dict(), restarting=True)
    assert prepare(second).opened.resumed_from == 80
    second.close()
    rule = second.early_stop
    assert (rule.best, rule.best_step) == (losses[best_step], best_step)
    assert rule.since_best == len([s for s in losses if s > best_step])


@pytest.mark.slow
@pytest.mark.ray
def test_stop_when_ends_the_run_early_with_its_checkpoints(local_ray, storage):  # noqa: F811
    # eval/loss falls as the MLP learns, so "max" never improves after the first.
    config = make_config(storage, "stop", model=MLP, steps=400, log_every=20,
                         checkpoint={"serving_every": 20, "full_every": 400},
                         eval={**EVAL, "stop_when": {"metric": "eval/loss",
                                                     "mode": "max", "patience": 2}})
    summary, lines = run_train(config)
    assert summary["early_stop"] and "eval/loss has not improved for 2" in \
        summary["early_stop"]
    assert summary["steps"] < 400
    assert any(line.startswith("early stop after step") for line in lines), lines
    entries = Catalog(RunLayout(storage, "stop")).entries("serving")
    assert len([e for e in entries if "eval/loss" in e.metrics]) >= 3
