"""Rank 0's variable snapshots (in-process, real TF): a snapshot holds the
values of the step it was taken at, whatever training does afterwards."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tensorflow as tf

from distributed.train.snapshot import VariableSnapshot


def _graph(optimizer, use_resource=True):
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)
        x = tf.compat.v1.placeholder(tf.float32, (None, 32))
        w = tf.compat.v1.get_variable("dense/kernel", (32, 64), use_resource=use_resource)
        b = tf.compat.v1.get_variable("dense/bias", (64,), use_resource=use_resource,
                                      initializer=tf.compat.v1.ones_initializer())
        ema = tf.compat.v1.get_variable("stats/mean", (64,), trainable=False,
                                        use_resource=use_resource,
                                        initializer=tf.compat.v1.zeros_initializer())
        h = tf.matmul(x, w) + b
        loss = tf.reduce_mean(tf.square(h))
        update = ema.assign(0.9 * ema + 0.1 * tf.reduce_mean(h, 0))
        with tf.control_dependencies([update]):
            train = optimizer().minimize(
                loss, global_step=tf.compat.v1.train.get_or_create_global_step())
        init = tf.compat.v1.global_variables_initializer()
        variables = tf.compat.v1.global_variables()
    return graph, x, train, init, variables


@pytest.mark.parametrize("optimizer", [
    lambda: tf.compat.v1.train.MomentumOptimizer(0.1, 0.9),
    lambda: tf.compat.v1.train.AdamOptimizer(0.01),
    lambda: tf.compat.v1.train.GradientDescentOptimizer(0.1),
], ids=["momentum", "adam", "sgd"])
@pytest.mark.parametrize("use_resource", [True, False], ids=["resource", "ref"])
def test_snapshot_keeps_the_values_of_its_step_while_training_goes_on(optimizer,
                                                                      use_resource):
    """Resource variables are copy-on-write; TF1 reference variables are
    updated in place, so the snapshot copies them."""
    graph, x, train, init, variables = _graph(optimizer, use_resource)
    names = [v.op.name for v in variables]
    trainable = [v.op.name for v in variables if v.trainable]
    snap = VariableSnapshot(variables, {"full": names, "serving": trainable})
    batch = np.random.RandomState(0).randn(16, 32).astype(np.float32)
    with tf.compat.v1.Session(graph=graph) as sess:
        sess.run(init)
        for round_ in range(3):
            for _ in range(2):
                sess.run(train, {x: batch})
            expected = sess.run({v.op.name: v for v in variables})
            group = "full" if round_ % 2 == 0 else "serving"
            snap.take(sess, group)
            for _ in range(3):  # the variables move on
                sess.run(train, {x: batch})
            got = {}
            # fetched on another thread, as rank 0 does
            t = threading.Thread(target=lambda: got.update(snap.fetch(sess, group)))
            t.start()
            t.join()
            assert set(got) == set(snap.groups[group])
            for name, value in got.items():
                np.testing.assert_array_equal(value, expected[name], err_msg=name)
            now = sess.run(variables[0])
            assert not np.array_equal(now, expected[variables[0].op.name])


def test_fetch_frees_the_shadows_and_the_next_take_recreates_them():
    graph, x, train, init, variables = _graph(
        lambda: tf.compat.v1.train.GradientDescentOptimizer(0.1))
    snap = VariableSnapshot(variables, {"full": [v.op.name for v in variables]})
    batch = np.ones((4, 32), np.float32)
    with tf.compat.v1.Session(graph=graph) as sess:
        sess.run(init)
        snap.take(sess, "full")
        first = snap.fetch(sess, "full")
        with pytest.raises(tf.errors.OpError):  # destroyed: nothing left to read
            snap.fetch(sess, "full")
        sess.run(train, {x: batch})
        snap.take(sess, "full")
        second = snap.fetch(sess, "full")
        assert not np.array_equal(first["dense/kernel"], second["dense/kernel"])
