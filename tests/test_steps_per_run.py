"""``steps_per_run``: several training steps per ``Session.run`` (an in-graph
loop). No Ray here: the loop graph and the one-step graph, built by the same
function from the same initial values, train on the same batches; every loss
and every variable (slots, moving statistics, averages, the global step) must
come out equal. The Ray replica test in test_train.py runs it on 2 workers."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.errors import ConfigError
from distributed.examples import digits, keras_app, wide_deep
from distributed.inputs.sources import DatasetSource, PythonSource
from distributed.inputs.spec import InputSpec
from distributed.train.graph import VariableLoader, build_train_graph
from distributed.train.schedule import CheckpointSchedule

DIGITS = "distributed.examples.digits"
ADAM_COSINE_EMA = {"name": "adam", "ema_decay": 0.9, "learning_rate": {
    "schedule": "cosine", "initial": 0.01, "decay_steps": 100, "warmup_steps": 3}}
RMSPROP_CLIP = {"name": "rmsprop", "learning_rate": 0.01, "clip_global_norm": 1.0}
WIDE_DEEP = {"hash_buckets": 2000, "cross_buckets": 1000, "embedding_dim": 4,
             "partitions": 3, "hidden": [8]}

CASES = {
    "mlp-adam-cosine-ema": (f"{DIGITS}:mlp_model_fn", {}, ADAM_COSINE_EMA,
                            f"{DIGITS}:digits_input_fn"),
    "cnn-bn-rmsprop-clip": (f"{DIGITS}:cnn_bn_model_fn", {}, RMSPROP_CLIP,
                            f"{DIGITS}:digits_input_fn"),
    "keras-cnn": ("distributed.examples.keras_digits:keras_cnn_model_fn", {},
                  {"name": "adam", "learning_rate": 0.01}, f"{DIGITS}:digits_input_fn"),
    "keras-mobilenet": ("distributed.examples.keras_app:app_model_fn", {},
                        {"name": "momentum", "learning_rate": 0.01},
                        "distributed.examples.keras_app:app_input_fn"),
    "wide-deep-adagrad": ("distributed.examples.wide_deep:wide_deep_model_fn", WIDE_DEEP,
                          {"name": "adagrad", "learning_rate": 0.1},
                          "distributed.examples.wide_deep:clicks_input_fn"),
}
BATCH = 16


def _batches(input_ref: str, n: int) -> list:
    fn = {f"{DIGITS}:digits_input_fn": digits.digits_input_fn,
          "distributed.examples.keras_app:app_input_fn": keras_app.app_input_fn,
          "distributed.examples.wide_deep:clicks_input_fn": wide_deep.clicks_input_fn,
          }[input_ref]
    batches = fn(0, 1, BATCH, {})
    return [next(batches) for _ in range(n)]


def _session(tg, values=None):
    sess = tf.compat.v1.Session(graph=tg.graph)
    sess.run(tg.init_op)
    if values is not None:
        VariableLoader(tg.variables).load(sess, values)
    return sess


def _values(tg, sess) -> dict:
    return sess.run({v.op.name: v for v in tg.variables})


@pytest.mark.parametrize("case", list(CASES))
def test_a_loop_of_steps_trains_exactly_as_single_steps(case):
    model, params, optimizer, input_ref = CASES[case]
    config = config_lib.from_dict({"model": model, "model_params": params,
                                   "optimizer": optimizer, "batch_size": BATCH})
    batches = _batches(input_ref, 10)
    spec = InputSpec.from_batch(*batches[0], "test")
    single = build_train_graph(config, spec)
    loop = build_train_graph(config, spec, steps_per_run=5)
    assert sorted(v.op.name for v in loop.variables) == \
        sorted(v.op.name for v in single.variables)
    s1 = _session(single)
    start = _values(single, s1)
    s2 = _session(loop, start)

    one = []
    for features, labels in batches:
        feed = {single.features[k]: v for k, v in features.items()}
        feed[single.labels] = labels
        one.append(s1.run([single.train_op, single.loss], feed)[1])
    stacked = {k: loop.graph.get_tensor_by_name(f"input/{k}:0") for k in batches[0][0]}
    labels = loop.graph.get_tensor_by_name("input/labels:0")
    looped = []
    for run in (batches[:5], batches[5:]):
        feed = {t: np.stack([b[0][k] for b in run]) for k, t in stacked.items()}
        feed.update({labels: np.stack([b[1] for b in run]), loop.steps: 5})
        looped += list(s2.run([loop.train_op, loop.loss], feed)[1])

    np.testing.assert_allclose(looped, one, rtol=1e-6)
    after1, after2 = _values(single, s1), _values(loop, s2)
    assert int(after2["global_step"]) == 10
    for name, value in after1.items():
        np.testing.assert_allclose(after2[name], value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        if name in single.averages.values() or name in {
                v.op.name for v in single.model_state}:
            assert not np.allclose(value, start[name]), f"{name} never moved"
    assert {v.op.name for v in loop.model_state} == {v.op.name for v in single.model_state}


def test_tf_data_input_reads_one_batch_per_step_of_the_loop():
    """A tf.data input's iterator is read inside the loop: 2 runs of 3 steps
    read the dataset's first 6 batches, as 6 single steps do."""
    def source():
        x = np.arange(6 * 4 * 64, dtype=np.float32).reshape(24, 64) / 1e4
        y = np.arange(24) % 10
        return DatasetSource(tf.data.Dataset.from_tensor_slices(
            ({"image": x}, y)).batch(4), "test", 0)

    config = config_lib.from_dict({"model": f"{DIGITS}:mlp_model_fn",
                                   "optimizer": {"name": "sgd", "learning_rate": 0.1}})
    single = build_train_graph(config, source)
    loop = build_train_graph(config, source, steps_per_run=3)
    s1, s2 = _session(single), None
    start = _values(single, s1)
    s2 = _session(loop, start)
    single.source.start(s1)
    loop.source.start(s2)
    one = [s1.run([single.train_op, single.loss])[1] for _ in range(6)]
    looped = [x for _ in range(2) for x in s2.run([loop.train_op, loop.loss],
                                                   {loop.steps: 3})[1]]
    np.testing.assert_allclose(looped, one, rtol=1e-6)
    with pytest.raises(tf.errors.OutOfRangeError):
        s2.run(loop.train_op, {loop.steps: 1})


def test_reference_variables_are_refused_with_the_fix():
    config = config_lib.from_dict(
        {"model": "tests.helpers.scoped_models:ref_variables_model_fn"})
    spec = InputSpec({"image": ("float32", (64,))}, ("int64", ()))
    with pytest.raises(ConfigError) as info:
        build_train_graph(config, spec, steps_per_run=4)
    message = str(info.value)
    assert "\n" not in message
    assert "steps_per_run" in message and "use_resource=False" in message, message


def test_runs_end_at_checkpoint_steps_and_round_ends():
    schedule = CheckpointSchedule(serving_every=10, full_every=25, last_step=60)
    ends, step = [], 0
    while step < 60:
        limit = min(60, (step // 20 + 1) * 20)  # rounds of log_every=20
        step = schedule.run_end(step, limit, steps_per_run=8)
        ends.append(step)
    assert ends == [8, 10, 18, 20, 25, 30, 38, 40, 48, 50, 58, 60]
    assert schedule.run_end(3, 100, 1) == 4


def test_batches_of_different_shapes_in_one_run_are_one_clear_error():
    def batches():
        yield {"image": np.zeros((4, 64), np.float32)}, np.zeros(4, np.int64)
        yield {"image": np.zeros((3, 64), np.float32)}, np.zeros(3, np.int64)

    source = PythonSource(batches(), "tests:partial", "input", 0, prefetch=0)
    with tf.Graph().as_default():
        source.step_reader()
    source.start()
    with pytest.raises(ConfigError, match=r"shapes \[\(3, 64\), \(4, 64\)\] .* "
                                          "steps_per_run: 1"):
        source.feed_steps(0, 2)
