"""The ``optimizer`` config: names, constructor keys, schedules, clipping.

No Ray: each test builds a tiny graph with :mod:`distributed.train.optimizers`,
runs it, and checks learning rates against the closed-form formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.errors import ConfigError, UserCodeError
from distributed.train import optimizers

HERE = "tests.test_optimizers"


def opt_config(value) -> config_lib.OptimizerConfig:
    return config_lib.from_dict({"optimizer": value}).optimizer


def rates_at(learning_rate, steps) -> list[float]:
    """The schedule's value at each global step in ``steps``."""
    graph = tf.Graph()
    with graph.as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        lr = optimizers.learning_rate_tensor(opt_config(
            {"learning_rate": learning_rate}).learning_rate, step)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            out = []
            for s in steps:
                step.load(s, sess)
                out.append(float(sess.run(lr)))
    return out


def train_steps(value, steps: int = 3, params=None):
    """Runs ``steps`` steps of a quadratic loss; returns (lrs, variable names, x)."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)
        x = tf.compat.v1.get_variable("x", initializer=tf.constant([3.0, -4.0]))
        loss = tf.reduce_sum(tf.square(x))
        step = tf.compat.v1.train.get_or_create_global_step()
        cfg = opt_config(value)
        opt, lr = optimizers.make_optimizer(cfg, step, params or {})
        gv = optimizers.clip_gradients(opt.compute_gradients(loss), cfg.clip_global_norm)
        train = opt.apply_gradients(gv, global_step=step)
        names = {v.op.name for v in tf.compat.v1.global_variables()}
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            lrs = [float(sess.run([train, lr])[1]) for _ in range(steps)]
            return lrs, names, sess.run(x)


# ------------------------------------------------------------- the table -----

def test_table_holds_every_v1_optimizer_that_takes_a_learning_rate():
    table = optimizers.optimizer_table()
    assert set(table) == {"adadelta", "adagrad", "adagrad_da", "adam", "ftrl",
                          "momentum", "proximal_adagrad", "proximal_gradient_descent",
                          "rmsprop", "sgd"}
    assert table["sgd"] is tf.compat.v1.train.GradientDescentOptimizer
    assert table["rmsprop"] is tf.compat.v1.train.RMSPropOptimizer


@pytest.mark.parametrize("name", sorted(optimizers.optimizer_table()))
def test_every_optimizer_trains(name):
    lrs, _, x = train_steps({"name": name, "learning_rate": 0.1}, steps=3)
    assert lrs == pytest.approx([0.1] * 3)
    assert np.sum(np.square(x)) < 25.0  # the loss went down from 25


def test_todays_configs_keep_working():
    graph = tf.Graph()
    with graph.as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        opt, _ = optimizers.make_optimizer(
            opt_config({"name": "momentum", "learning_rate": 0.05}), step, {})
        assert isinstance(opt, tf.compat.v1.train.MomentumOptimizer)
        assert opt._momentum == 0.9  # today's default
        opt, _ = optimizers.make_optimizer(
            opt_config({"name": "adam", "learning_rate": 0.001}), step, {})
        assert isinstance(opt, tf.compat.v1.train.AdamOptimizer)


def test_constructor_keys_reach_the_optimizer_and_slots_are_made():
    _, names, _ = train_steps({"name": "rmsprop", "learning_rate": 0.01, "decay": 0.8,
                               "momentum": 0.5, "centered": True})
    assert {"x/RMSProp", "x/RMSProp_1", "x/RMSProp_2"} <= names


def test_config_round_trips_through_to_dict():
    data = {"name": "rmsprop", "decay": 0.8, "clip_global_norm": 1.0,
            "learning_rate": {"schedule": "cosine", "initial": 0.1, "decay_steps": 10}}
    config = config_lib.from_dict({"optimizer": data})
    assert config.optimizer.kwargs == {"decay": 0.8}
    assert config_lib.from_dict(config.to_dict()) == config
    assert config.to_dict()["optimizer"] == {**data}


def test_an_older_run_record_still_loads():
    """Records written before the generic optimizer held ``momentum`` for every
    optimizer; reading them (export, gc) checks the form only."""
    config = config_lib.from_dict({"optimizer": {"name": "adam", "learning_rate": 0.001,
                                                 "momentum": 0.9}})
    assert config.optimizer.kwargs == {"momentum": 0.9}


def test_clip_global_norm_clips_the_gradients():
    # Gradient of sum(x^2) at (3, -4) is (6, -8), norm 10; clipped to norm 1,
    # one SGD step with lr 1 moves x by (0.6, -0.8).
    _, _, x = train_steps({"name": "sgd", "learning_rate": 1.0,
                           "clip_global_norm": 1.0}, steps=1)
    np.testing.assert_allclose(x, [2.4, -3.2], rtol=1e-6)


# -------------------------------------------------------------- schedules -----

STEPS = [0, 1, 5, 10, 15, 20, 40]


def expected(kind: str, s: int) -> float:
    if kind == "exponential":
        return 0.1 * 0.5 ** (s / 10)
    if kind == "staircase":
        return 0.1 * 0.5 ** (s // 10)
    if kind == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(s, 20) / 20))
        return 0.1 * ((1 - 0.1) * decay + 0.1)
    if kind == "polynomial":
        return (0.1 - 0.01) * (1 - min(s, 20) / 20) ** 2.0 + 0.01
    if kind == "piecewise":
        return 0.1 if s <= 5 else 0.05 if s <= 15 else 0.01
    return 0.1


SCHEDULES = {
    "constant": {"schedule": "constant", "initial": 0.1},
    "exponential": {"schedule": "exponential", "initial": 0.1, "decay_steps": 10,
                    "decay_rate": 0.5},
    "staircase": {"schedule": "exponential", "initial": 0.1, "decay_steps": 10,
                  "decay_rate": 0.5, "staircase": True},
    "cosine": {"schedule": "cosine", "initial": 0.1, "decay_steps": 20, "alpha": 0.1},
    "polynomial": {"schedule": "polynomial", "initial": 0.1, "decay_steps": 20,
                   "end_learning_rate": 0.01, "power": 2.0},
    "piecewise": {"schedule": "piecewise", "boundaries": [5, 15],
                  "values": [0.1, 0.05, 0.01]},
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_schedule_values_match_the_closed_form(kind):
    got = rates_at(SCHEDULES[kind], STEPS)
    assert got == pytest.approx([expected(kind, s) for s in STEPS], rel=1e-5)


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_warmup_ramps_linearly_then_follows_the_schedule(kind):
    got = rates_at({**SCHEDULES[kind], "warmup_steps": 10}, STEPS)
    want = [expected(kind, s) * min(1.0, s / 10) for s in STEPS]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert got[0] == 0.0


def test_the_rate_a_step_uses_follows_the_global_step():
    lrs, _, _ = train_steps({"name": "adagrad", "learning_rate": SCHEDULES["exponential"]},
                            steps=3)
    assert lrs == pytest.approx([expected("exponential", s) for s in range(3)], rel=1e-5)


# ------------------------------------------------------ optimizer functions -----

def good_optimizer_fn(learning_rate, params):
    return tf.compat.v1.train.MomentumOptimizer(learning_rate, params["momentum"])


def not_an_optimizer_fn(learning_rate, params):
    return "adam"


def raising_optimizer_fn(learning_rate, params):
    raise RuntimeError("boom from raising_optimizer_fn")


def test_a_function_builds_the_optimizer_with_the_schedule():
    lrs, names, _ = train_steps(f"{HERE}:good_optimizer_fn", params={"momentum": 0.5})
    assert lrs == pytest.approx([0.001] * 3)
    assert "x/Momentum" in names
    lrs, _, _ = train_steps({"name": f"{HERE}:good_optimizer_fn",
                             "learning_rate": SCHEDULES["piecewise"]},
                            params={"momentum": 0.5})
    assert lrs == pytest.approx([0.1] * 3)


# ----------------------------------------------------------- bad configs -----

BAD = [
    ("unknown-name", {"name": "adamw"}, r"^optimizer\.name: 'adamw' is not valid; .*"
     r"use one of adadelta, adagrad, .*rmsprop, sgd or 'package\.module:function'"),
    ("name-suggestion", {"name": "rmsprp"}, r"did you mean 'rmsprop'\?"),
    ("unknown-kwarg", {"name": "rmsprop", "decy": 0.9},
     r"^optimizer\.decy: unknown key for rmsprop \(RMSPropOptimizer\); did you mean "
     r"'decay'\? valid keys are .*decay, momentum, epsilon"),
    ("kwarg-of-another-optimizer", {"name": "adam", "momentum": 0.9},
     r"^optimizer\.momentum: unknown key for adam .*beta1"),
    ("supplied-kwarg", {"name": "adagrad_da", "global_step": 3},
     r"^optimizer\.global_step: unknown key"),
    ("bad-kwarg-value", {"name": "adagrad", "initial_accumulator_value": -1.0},
     r"^optimizer: AdagradOptimizer\(.*initial_accumulator_value=-1\.0.*\) failed"),
    ("unknown-schedule-key", {"learning_rate": {"schedule": "cosine", "initial": 0.1,
                                                "decay_step": 10}},
     r"^optimizer\.learning_rate\.decay_step: unknown key for the cosine schedule "
     r"\(cosine_decay\); did you mean 'decay_steps'\?"),
    ("constant-schedule-key", {"learning_rate": {"schedule": "constant", "initial": 0.1,
                                                 "decay_steps": 10}},
     r"^optimizer\.learning_rate\.decay_steps: unknown key for the constant schedule"),
    ("missing-schedule-key", {"learning_rate": {"schedule": "exponential",
                                                "initial": 0.1, "decay_steps": 10}},
     r"^optimizer\.learning_rate\.decay_rate: missing; .*exponential_decay"),
    ("piecewise-lengths", {"learning_rate": {"schedule": "piecewise",
                                             "boundaries": [5], "values": [1.0]}},
     r"^optimizer\.learning_rate: piecewise_constant\(.*\) failed"),
    ("piecewise-values", {"learning_rate": {"schedule": "piecewise",
                                            "boundaries": [5], "values": "fast"}},
     r"^optimizer\.learning_rate\.values: expected a list of numbers"),
    ("function-not-importable", "no_such_module_xyz:make_optimizer",
     r"^optimizer: cannot import module 'no_such_module_xyz'"),
    ("function-wrong-return", f"{HERE}:not_an_optimizer_fn",
     r"^optimizer: .*not_an_optimizer_fn returned str; it must return a "
     r"tf\.compat\.v1\.train\.Optimizer"),
]


@pytest.mark.parametrize("value,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_optimizer_configs_fail_the_check(value, match):
    with pytest.raises(ConfigError, match=match):
        optimizers.check(opt_config(value), {})


def test_an_optimizer_function_that_raises_shows_its_traceback():
    with pytest.raises(UserCodeError, match=r"boom from raising_optimizer_fn"):
        optimizers.check(opt_config(f"{HERE}:raising_optimizer_fn"), {})


FORM = [
    ("not-a-ref", "adam", r"^optimizer: expected a mapping such as \{name: adam"),
    ("unknown-schedule", {"learning_rate": {"schedule": "cosin", "initial": 0.1}},
     r"^optimizer\.learning_rate\.schedule: 'cosin' is not valid; did you mean "
     r"'cosine'\? use one of constant, piecewise"),
    ("no-initial", {"learning_rate": {"schedule": "cosine", "decay_steps": 5}},
     r"^optimizer\.learning_rate\.initial: missing"),
    ("piecewise-initial", {"learning_rate": {"schedule": "piecewise", "initial": 0.1,
                                             "boundaries": [1], "values": [1, 2]}},
     r"^optimizer\.learning_rate\.initial: a piecewise schedule takes no initial"),
    ("warmup-negative", {"learning_rate": {"schedule": "constant", "initial": 0.1,
                                           "warmup_steps": -1}},
     r"^optimizer\.learning_rate\.warmup_steps: expected an integer >= 0"),
    ("clip-zero", {"clip_global_norm": 0}, r"^optimizer\.clip_global_norm: expected a "
     r"positive number, got 0"),
    ("function-with-kwargs", {"name": f"{HERE}:good_optimizer_fn", "momentum": 0.5},
     r"^optimizer\.momentum: an optimizer function .* takes no constructor arguments"),
]


@pytest.mark.parametrize("value,match", [c[1:] for c in FORM], ids=[c[0] for c in FORM])
def test_malformed_optimizer_configs_fail_validation(value, match):
    with pytest.raises(ConfigError, match=match):
        opt_config(value)


# ----------------------------------------------- clipping after the all-reduce -----

def quadratic_model_fn(features, labels, mode, params):
    from distributed.model import ModelSpec
    x = tf.compat.v1.get_variable("x", initializer=tf.constant([3.0, -4.0]))
    return ModelSpec(loss=tf.reduce_sum(tf.square(x)) + 0.0 * tf.reduce_sum(
        features["a"]), predictions={"x": x})


def test_build_train_graph_clips_after_the_reduce_and_reports_the_rate():
    """A reduce that sums 10 workers' gradients: clipping after it bounds the
    update by clip_global_norm (clipping before would move x 10 times as far)."""
    from distributed.inputs.spec import InputSpec
    from distributed.train.graph import build_train_graph

    def sum_of_ten(pairs):
        return [(10.0 * g, v) for g, v in pairs]

    config = config_lib.from_dict({
        "model": f"{HERE}:quadratic_model_fn", "optimizer": {
            "name": "sgd", "clip_global_norm": 1.0, "learning_rate": {
                "schedule": "constant", "initial": 1.0, "warmup_steps": 2}}})
    tg = build_train_graph(config, InputSpec({"a": ("float32", (1,))}, ("int64", ())),
                           reduce_fn=sum_of_ten)
    with tf.compat.v1.Session(graph=tg.graph) as sess:
        sess.run(tg.init_op)
        feed = {tg.features["a"]: np.zeros((1, 1), np.float32), tg.labels: [0]}
        rates = [float(sess.run([tg.train_op, tg.learning_rate], feed)[1])
                 for _ in range(3)]
        x = sess.run(tg.variables[[v.op.name for v in tg.variables].index("x")])
    assert rates == pytest.approx([0.0, 0.5, 1.0])  # warmup over 2 steps
    # Steps of length 0, 0.5 and 1 along the gradient's direction (0.6, -0.8).
    np.testing.assert_allclose(x, [3.0 - 1.5 * 0.6, -4.0 + 1.5 * 0.8], rtol=1e-5)
