"""Example inputs and models: sharding, learnability, and batch-norm statistics.

Single process, no Ray: each model trains a few hundred steps on the real
digits in a fresh ``tf.Graph`` with a plain optimizer.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from distributed.examples import digits
from distributed.model import EVAL, PREDICT, TRAIN

STEPS = 300
BATCH = 64


def _placeholders(num_features: int = 64):
    """Feature and label placeholders shaped like the framework's."""
    image = tf.compat.v1.placeholder(tf.float32, [None, num_features], name="image")
    labels = tf.compat.v1.placeholder(tf.int64, [None], name="labels")
    return {"image": image}, labels


def _train(model_fn, input_fn, params, steps=STEPS, lr=1e-3):
    """Builds train and predict modes in one graph, trains, returns the pieces.

    Returns:
        ``(session, features, train_spec, predict_spec, losses)``; the caller
        closes the session.
    """
    graph = tf.Graph()
    with graph.as_default():
        features, labels = _placeholders(params.get("features", 64))
        spec = model_fn(features, labels, TRAIN, params)
        with tf.control_dependencies(
                tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)):
            train_op = tf.compat.v1.train.AdamOptimizer(lr).minimize(spec.loss)
        predict = model_fn(features, None, PREDICT, params)
        init = tf.compat.v1.global_variables_initializer()
    sess = tf.compat.v1.Session(graph=graph)
    sess.run(init)
    batches = input_fn(0, 1, BATCH, params)
    losses = []
    for _ in range(steps):
        x, y = next(batches)
        loss, _ = sess.run([spec.loss, train_op],
                           {features["image"]: x["image"], labels: y})
        losses.append(loss)
    return sess, features, spec, predict, np.array(losses)


def _accuracy(sess, features, predict, split="test"):
    x, y = digits.digits_eval_arrays(split)
    classes = sess.run(predict.predictions["classes"], {features["image"]: x["image"]})
    return float(np.mean(classes == y))


def _var_names(model_fn, mode, params=None):
    graph = tf.Graph()
    with graph.as_default():
        features, labels = _placeholders()
        model_fn(features, None if mode == PREDICT else labels, mode, params or {})
        return ({v.op.name for v in tf.compat.v1.global_variables()},
                {v.op.name for v in tf.compat.v1.trainable_variables()})


def _rows(features, labels):
    """Each example as a hashable key (pixels and label)."""
    return [(x.tobytes(), int(y)) for x, y in zip(features, labels)]


# --------------------------------------------------------------------- inputs


def test_digits_batches_have_contract_shapes_and_dtypes():
    x, y = next(digits.digits_input_fn(0, 1, 32, {}))
    assert set(x) == {"image"}
    assert x["image"].shape == (32, 64) and x["image"].dtype == np.float32
    assert y.shape == (32,) and y.dtype == np.int64
    assert 0.0 <= x["image"].min() and x["image"].max() <= 1.0
    train_x, _ = digits.digits_eval_arrays("train")
    test_x, test_y = digits.digits_eval_arrays("test")
    assert len(train_x["image"]) == digits.NUM_TRAIN
    assert len(test_x["image"]) == len(test_y) == 1797 - digits.NUM_TRAIN


def test_digits_read_without_sklearn_equal_load_digits(monkeypatch):
    from sklearn.datasets import load_digits
    expected = load_digits()
    images, labels = digits._load_digits.__wrapped__()
    np.testing.assert_array_equal(images, (expected.data / 16.0).astype(np.float32))
    np.testing.assert_array_equal(labels, expected.target)
    assert digits._bundled_digits_csv() is not None
    # Where the CSV is not found, scikit-learn's own loader gives the same.
    monkeypatch.setattr(digits, "_bundled_digits_csv", lambda: None)
    fallback_images, fallback_labels = digits._load_digits.__wrapped__()
    np.testing.assert_array_equal(fallback_images, images)
    np.testing.assert_array_equal(fallback_labels, labels)


@pytest.mark.parametrize("num_workers", [1, 3, 7])
def test_digits_shards_are_disjoint_and_cover_the_train_split(num_workers):
    epochs = []
    for i in range(num_workers):
        shard_size = len(range(i, digits.NUM_TRAIN, num_workers))
        it = digits.digits_input_fn(i, num_workers, 50, {"seed": 3})
        xs, ys = zip(*((b["image"], l) for b, l in
                       (next(it) for _ in range(-(-shard_size // 50)))))
        epochs.append(_rows(np.concatenate(xs)[:shard_size],
                            np.concatenate(ys)[:shard_size]))
    # One epoch of each worker is a permutation of its shard, so together
    # they must be exactly the train split, each example once.
    train_x, train_y = digits.digits_eval_arrays("train")
    seen = collections.Counter(r for epoch in epochs for r in epoch)
    assert seen == collections.Counter(_rows(train_x["image"], train_y))


def test_digits_shuffle_is_seeded_and_differs_per_epoch_and_worker():
    def first(worker, seed, n=1):
        it = digits.digits_input_fn(worker, 2, 750, {"seed": seed})
        return [next(it)[1] for _ in range(n)]

    assert np.array_equal(first(0, 5)[0], first(0, 5)[0])
    assert not np.array_equal(first(0, 5)[0], first(0, 6)[0])
    epoch_1, epoch_2 = first(0, 5, n=2)  # batch size == shard size
    assert sorted(epoch_1) == sorted(epoch_2) and not np.array_equal(epoch_1, epoch_2)
    test_y = next(digits.digits_input_fn(0, 1, 297, {"split": "test"}))[1]
    assert sorted(test_y) == sorted(digits.digits_eval_arrays("test")[1])


def test_input_fns_reject_bad_shard_arguments():
    with pytest.raises(ValueError, match="worker_index"):
        digits.digits_input_fn(2, 2, 8, {})
    with pytest.raises(ValueError, match="split"):
        digits.digits_input_fn(0, 1, 8, {"split": "validation"})
    with pytest.raises(ValueError, match="batch_size"):
        digits.synthetic_input_fn(0, 1, 0, {})


def test_synthetic_input_is_learnable():
    params = {"features": 20, "classes": 4, "seed": 1, "hidden": [32],
              "num_classes": 4}
    x, y = next(digits.synthetic_input_fn(1, 2, 16, params))
    assert x["image"].shape == (16, 20) and x["image"].dtype == np.float32
    assert y.dtype == np.int64
    other = next(digits.synthetic_input_fn(0, 2, 16, params))[0]["image"]
    assert not np.array_equal(x["image"], other)  # workers see different data
    sess, *_, losses = _train(digits.mlp_model_fn, digits.synthetic_input_fn,
                              params, steps=200, lr=1e-2)
    sess.close()
    assert losses[-20:].mean() < 0.5 * losses[:5].mean()


# --------------------------------------------------------------------- models


def test_mlp_learns_digits():
    sess, features, _, predict, losses = _train(
        digits.mlp_model_fn, digits.digits_input_fn, {})
    with sess:
        assert losses[-20:].mean() < 0.5 * losses[:5].mean()
        assert _accuracy(sess, features, predict) > 0.8
        assert set(predict.predictions) == {"logits", "probabilities", "classes"}


def test_mlp_variable_names_are_stable_and_all_trainable():
    expected = {f"mlp/{layer}/{v}" for layer in ("dense_0", "dense_1", "logits")
                for v in ("kernel", "bias")}
    for mode in (TRAIN, EVAL, PREDICT):
        all_names, trainable = _var_names(digits.mlp_model_fn, mode)
        assert all_names == trainable == expected


def test_cnn_variable_names_match_across_modes_and_stats_are_not_trainable():
    moving = {f"cnn/conv_{i}/bn/{s}" for i in (0, 1)
              for s in ("moving_mean", "moving_variance")}
    trainable = {"cnn/logits/kernel", "cnn/logits/bias"} | {
        f"cnn/conv_{i}/{v}" for i in (0, 1) for v in ("kernel", "bn/gamma", "bn/beta")}
    for mode in (TRAIN, EVAL, PREDICT):
        names = _var_names(digits.cnn_bn_model_fn, mode)
        assert names == (moving | trainable, trainable)
    graph = tf.Graph()
    with graph.as_default():
        digits.cnn_bn_model_fn(*_placeholders(), TRAIN, {})
        averaged = graph.get_collection(tf.compat.v1.GraphKeys.MOVING_AVERAGE_VARIABLES)
        assert {v.op.name for v in averaged} == moving
        assert len(graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)) == 4


def test_initial_values_depend_only_on_seed():
    def initial(seed):
        graph = tf.Graph()
        with graph.as_default():
            digits.cnn_bn_model_fn(*_placeholders(), TRAIN, {"seed": seed})
            with tf.compat.v1.Session() as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                return sess.run({v.op.name: v for v in
                                 tf.compat.v1.global_variables()}["cnn/conv_0/kernel"])

    assert np.array_equal(initial(4), initial(4))
    assert not np.array_equal(initial(4), initial(5))


def test_cnn_trains_updates_moving_stats_and_predict_reads_them(tmp_path):
    sess, features, _, predict, losses = _train(
        digits.cnn_bn_model_fn, digits.digits_input_fn, {}, lr=3e-3)
    with sess:
        assert losses[-20:].mean() < 0.5 * losses[:5].mean()
        assert _accuracy(sess, features, predict) > 0.8
        graph = sess.graph
        moving = {v.op.name: v for v in graph.get_collection(
            tf.compat.v1.GraphKeys.MOVING_AVERAGE_VARIABLES)}
        stats = sess.run(moving)
        for name, value in stats.items():
            initial = 0.0 if name.endswith("moving_mean") else 1.0
            assert not np.allclose(value, initial), name
        x, _ = digits.digits_eval_arrays("test")
        feed = {features["image"]: x["image"][:50]}
        before = sess.run(predict.predictions["logits"], feed)
        mean = moving["cnn/conv_0/bn/moving_mean"]
        mean.load(stats["cnn/conv_0/bn/moving_mean"] + 1.0, sess)
        after = sess.run(predict.predictions["logits"], feed)
        assert not np.allclose(before, after)
        mean.load(stats["cnn/conv_0/bn/moving_mean"], sess)
        saver = tf.compat.v1.train.Saver(tf.compat.v1.global_variables(scope="cnn"))
        path = saver.save(sess, str(tmp_path / "ckpt"))

    # The train graph's checkpoint restores into a predict-only graph.
    with tf.Graph().as_default(), tf.compat.v1.Session() as served:
        image, _ = _placeholders()
        spec = digits.cnn_bn_model_fn(image, None, PREDICT, {})
        tf.compat.v1.train.Saver().restore(served, path)
        feed = {image["image"]: x["image"][:50]}
        assert np.allclose(served.run(spec.predictions["logits"], feed), before,
                           atol=1e-5)
