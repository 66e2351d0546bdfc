"""The wide-and-deep example: its data, what it learns, and its config run as
a user runs it (partitioned tables, sparse gradients, Adagrad, evaluation,
export)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.examples import wide_deep
from distributed.model import EVAL, PREDICT, TRAIN
from distributed.serving import job
from tests.conftest import REPO_ROOT
from tests.helpers.training import run_train

CONFIG = os.path.join(REPO_ROOT, "jobs", "configs", "wide_deep.yaml")
SMALL = {"hash_buckets": 5000, "cross_buckets": 3000, "embedding_dim": 8,
         "partitions": 3, "hidden": [16]}


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based AUC (ties broken by order; scores are continuous)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(len(scores))
    pos = labels == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 - 1) / 2) / (n1 * n0))


def _placeholders():
    features = {k: tf.compat.v1.placeholder(tf.int64, [None], name=k)
                for k in wide_deep.ID_FEATURES}
    features["dense"] = tf.compat.v1.placeholder(tf.float32, [None, wide_deep.NUM_DENSE],
                                                 name="dense")
    return features, tf.compat.v1.placeholder(tf.int64, [None], name="clicks")


def _feed(features, labels, batch):
    x, y = batch
    feed = {features[k]: x[k] for k in features}
    if labels is not None:
        feed[labels] = y
    return feed


def test_clicks_are_learnable_shards_differ_and_eval_set_is_held_out():
    teacher = wide_deep._Teacher(0)
    x, y = wide_deep.click_arrays(20000, seed=0, stream=5)
    # The teacher's own AUC bounds what a model can reach: well above chance.
    assert _auc(teacher.logit(x["user"], x["item"], x["category"], x["dense"]), y) > 0.8
    assert 0.2 < y.mean() < 0.8
    a = next(wide_deep.clicks_input_fn(0, 2, 64, {}))
    b = next(wide_deep.clicks_input_fn(1, 2, 64, {}))
    assert not np.array_equal(a[0]["user"], b[0]["user"])
    again = next(wide_deep.clicks_input_fn(0, 2, 64, {}))
    np.testing.assert_array_equal(a[0]["user"], again[0]["user"])
    held_out = list(wide_deep.clicks_eval_input_fn(0, 1, 1000, {}))
    assert [len(b[1]) for b in held_out] == [1000] * 4 + [96]


def test_model_trains_with_sparse_partitioned_gradients_and_beats_chance():
    graph = tf.Graph()
    with graph.as_default():
        features, labels = _placeholders()
        spec = wide_deep.wide_deep_model_fn(features, labels, TRAIN, SMALL)
        optimizer = tf.compat.v1.train.AdagradOptimizer(0.1)
        grads = optimizer.compute_gradients(spec.loss)
        train_op = optimizer.apply_gradients(grads)
        predict = wide_deep.wide_deep_model_fn(features, None, PREDICT, SMALL)
        evaluate = wide_deep.wide_deep_model_fn(features, labels, EVAL, SMALL)
        init = tf.compat.v1.global_variables_initializer()
    by_name = {v.op.name: g for g, v in grads}
    # The id table is 3 partitions, and its gradients stay sparse.
    parts = [n for n in by_name if n.startswith("wide_deep/deep/id_embedding/part_")]
    assert sorted(parts) == [f"wide_deep/deep/id_embedding/part_{i}" for i in range(3)]
    assert all(isinstance(by_name[n], tf.IndexedSlices) for n in parts)
    assert set(evaluate.eval_metrics) == {"auc", "accuracy"}
    with tf.compat.v1.Session(graph=graph) as sess:
        sess.run(init)
        batches = wide_deep.clicks_input_fn(0, 1, 128, {})
        losses = [sess.run([spec.loss, train_op], _feed(features, labels,
                                                        next(batches)))[0]
                  for _ in range(800)]
        x, y = wide_deep.click_arrays(4096, 0, 0)
        scores = sess.run(predict.predictions["probability"],
                          _feed(features, None, (x, None)))
    assert np.mean(losses[-100:]) < np.mean(losses[:100])
    assert _auc(scores, y) > 0.7


def test_bad_params_are_named():
    with tf.Graph().as_default(), pytest.raises(ValueError, match="unknown key"):
        features, labels = _placeholders()
        wide_deep.wide_deep_model_fn(features, labels, TRAIN, {"embeding_dim": 8})


@pytest.mark.slow
@pytest.mark.ray
def test_the_config_runs_as_it_is_and_its_export_serves(local_ray, storage,  # noqa: F811
                                                        tmp_path):
    """jobs/configs/wide_deep.yaml with fewer steps: sparse exchange, Adagrad,
    evaluation on the held-out clicks; the best-by-AUC export serves that AUC."""
    config = config_lib.load(CONFIG, {"storage": storage, "steps": 600})
    config = config_lib.from_dict({**config.to_dict(), "log_every": 200,
                                   "checkpoint": {"serving_every": 300,
                                                  "full_every": 600}})
    summary, lines = run_train(config)
    assert summary["steps"] == 600, lines
    entries = Catalog(RunLayout(storage, "wide-deep")).entries()
    serving = [e for e in entries if e.tier == "serving"]
    full = [e for e in entries if e.tier == "full"]
    scored = [e for e in serving if "eval/auc" in e.metrics]
    assert scored and max(e.metrics["eval/auc"] for e in scored) > 0.7, lines
    # Serving checkpoints leave out Adagrad's accumulators: about half the bytes.
    assert full[-1].num_bytes >= 1.9 * serving[-1].num_bytes
    result = job.restore_once(storage, "wide-deep", str(tmp_path / "export"),
                              best="eval/auc:max", echo=lambda s: None)
    served = tf.saved_model.load(result.export_dir).signatures["serving_default"]
    x, y = wide_deep.click_arrays(4096, 0, 0)
    out = served(**{k: tf.constant(v) for k, v in x.items()})["probability"].numpy()
    best = max(scored, key=lambda e: (e.metrics["eval/auc"], e.step))
    assert result.step == best.step
    assert _auc(out, y) == pytest.approx(best.metrics["eval/auc"], abs=0.02)


@pytest.mark.parametrize("optimizer,sparse_apply", [
    ({"name": "adagrad", "learning_rate": 0.1}, "ResourceSparseApplyAdagrad"),
    ({"name": "ftrl", "learning_rate": 0.1}, "ResourceSparseApplyFtrl"),
], ids=["adagrad", "ftrl"])
def test_two_workers_gather_every_table_part_and_apply_it_sparsely(optimizer,
                                                                   sparse_apply):
    """The workers' graph for 2 workers (built here, no Ray): each part of the
    partitioned tables is gathered, never all-reduced whole, and the optimizer
    updates it with its sparse kernel."""
    import functools

    from distributed.inputs.spec import InputSpec
    from distributed.train import collective
    from distributed.train.graph import build_train_graph
    config = config_lib.from_dict({
        "model": "distributed.examples.wide_deep:wide_deep_model_fn",
        "model_params": SMALL, "optimizer": optimizer, "batch_size": 64})
    reduce_fn = functools.partial(
        collective.allreduce_gradients, batch_size=64,
        spec=collective.GroupSpec(("127.0.0.1:1", "127.0.0.1:2"), 0))
    spec = InputSpec.from_batch(*next(wide_deep.clicks_input_fn(0, 1, 8, {})), "test")
    graph = build_train_graph(config, spec, reduce_fn=reduce_fn).graph
    ops = graph.get_operations()
    collectives = [op for op in ops if op.type.startswith("Collective")]
    # Nothing of a table's size crosses the wire: the largest part is 1667 x 8.
    assert all((op.inputs[0].shape.num_elements() or 0) < 1667 * 8 for op in collectives
               if op.inputs[0].shape.is_fully_defined())
    updated = {op.inputs[0].op.name.split("/ResourceSparseApply")[0]
               for op in ops if op.type == sparse_apply}
    parts = [f"wide_deep/deep/id_embedding/part_{i}" for i in range(3)] + [
        f"wide_deep/wide/user_x_item/part_{i}" for i in range(3)]
    for part in parts:
        assert any(part in name for name in updated), (part, sorted(updated))
