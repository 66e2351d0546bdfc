"""The kinds of input, in one process on real TF graphs (no Ray).

tf.data inputs are built inside the graph and read without feeds; Python
generators are read ahead on a background thread and keep their user-code
errors; Estimator input functions are adapted; bad element specs are one clear
error each.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed import inputs
from distributed.errors import ConfigError, UserCodeError
from distributed.model.estimator import from_estimator_input
from distributed.inputs.sources import DatasetSource, PythonSource, ends_with_prefetch
from distributed.inputs.spec import InputSpec
from distributed.train.graph import build_train_graph

HERE = "tests.test_inputs"
TFDATA = "distributed.examples.digits_inputs:digits_dataset_input_fn"


def make_config(**overrides):
    data = {"model": "distributed.examples.digits:mlp_model_fn", "batch_size": 16,
            "steps": 30, "workers": 2}
    data.update(overrides)
    return config_lib.from_dict(data)


# ------------------------------------------------------------ tf.data -----

def test_tfdata_input_trains_in_graph_without_feeds():
    config = make_config(input=TFDATA, optimizer={"name": "adam", "learning_rate": 0.01})
    tg = build_train_graph(config, lambda: inputs.open_source(config, 1))
    assert isinstance(tg.source, DatasetSource)
    assert tg.source.spec == InputSpec({"image": ("float32", (64,))}, ("int64", ()))
    # The model reads the iterator's tensors: the graph has no placeholders
    # for the input.
    assert not [op for op in tg.graph.get_operations() if op.type == "Placeholder"
                and op.name.startswith("input")]
    assert tg.features["image"].op.type == "IteratorGetNext"
    with tf.compat.v1.Session(graph=tg.graph) as sess:
        sess.run(tg.init_op)
        tg.source.start(sess)
        losses = []
        for step in range(60):
            assert tg.source.feed(step) is None
            losses.append(sess.run([tg.train_op, tg.loss])[1])
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), losses


def test_prefetch_added_only_when_missing():
    with tf.Graph().as_default():
        plain = tf.data.Dataset.range(10).map(lambda i: ({"x": [i]}, i)).batch(2)
        assert not ends_with_prefetch(plain)
        source = DatasetSource(plain, "test:plain", 0)
        # The iterator's dataset is a prefetch of the user's.
        ops = {op.type for op in tf.compat.v1.get_default_graph().get_operations()}
        assert "PrefetchDataset" in ops
        assert ends_with_prefetch(plain.prefetch(3))
        assert source.spec.features == {"x": ("int64", (1,))}


def _shuffled_ids():
    return tf.data.Dataset.range(64).shuffle(16, seed=3).repeat().batch(4).map(
        lambda ids: ({"id": ids}, ids % 2))


def test_position_fetched_in_the_step_equals_the_one_taken_after_it():
    """``position_after`` (fetched in a step's run, serialized beside it)
    holds the position after that step, as ``position`` (between runs) does:
    restoring either goes on with the same next batches (the bytes may differ:
    the prefetch buffer fills meanwhile). A GPU worker that saves positions
    keeps the iterator on the CPU (prefetch_to_device cannot be saved)."""
    with tf.Graph().as_default():
        source = DatasetSource(_shuffled_ids(), "test:ids", 0, gpu=True,
                               saves_position=True)
        features, labels = source.tensors()
        in_step = source.position_after(tf.nest.flatten((features, labels)))
        ops = {op.type for op in tf.compat.v1.get_default_graph().get_operations()}
        assert "GeneratorDataset" not in ops  # no prefetch_to_device
        with tf.compat.v1.Session() as sess:
            source.start(sess)
            source.check_position(sess)
            for _ in range(5):
                sess.run(features)
            _, fetched = sess.run([features, in_step])
            between = source.position(sess)
            after = [sess.run(features)["id"] for _ in range(3)]
            source.restore_position(sess, fetched)
            again = [sess.run(features)["id"] for _ in range(3)]
            source.restore_position(sess, between)
            once_more = [sess.run(features)["id"] for _ in range(3)]
    np.testing.assert_array_equal(after, again)
    np.testing.assert_array_equal(after, once_more)


def test_dataset_tensorflow_cannot_save_is_refused_with_the_choices():
    with tf.Graph().as_default():
        data = _shuffled_ids().apply(
            tf.data.experimental.prefetch_to_device("/device:CPU:0"))
        source = DatasetSource(data, "test:ids", 0, saves_position=True)
        with tf.compat.v1.Session() as sess:
            source.start(sess)
            with pytest.raises(ConfigError) as e:
                source.check_position(sess)
    message = str(e.value)
    assert "GeneratorDataset" in message and "prefetch_to_device" in message, message
    assert "input_position: restart" in message and "\n" not in message, message


def finite_input_fn(worker_index, num_workers, batch_size, params):
    return tf.data.Dataset.from_tensor_slices(
        ({"image": np.zeros((40, 64), np.float32)}, np.zeros(40, np.int64))
    ).batch(batch_size)


def filtered_input_fn(worker_index, num_workers, batch_size, params):
    """Unknown cardinality (a filter): only a step can find that it ends."""
    return tf.data.Dataset.from_tensor_slices(
        ({"image": np.zeros((40, 64), np.float32)}, np.zeros(40, np.int64))
    ).filter(lambda f, y: True).batch(batch_size)


def test_finite_dataset_is_refused_before_training():
    config = make_config(input=f"{HERE}:finite_input_fn", steps=30)
    with pytest.raises(ConfigError, match=r"holds 3 batch\(es\).*30 steps.*"
                                          r"\.repeat\(\)"):
        inputs.probe_spec(config)
    assert inputs.probe_spec(make_config(input=f"{HERE}:finite_input_fn", steps=3))


def test_dataset_that_ends_in_a_step_names_the_fix():
    config = make_config(input=f"{HERE}:filtered_input_fn")
    inputs.probe_spec(config)  # unknown cardinality passes the probe
    tg = build_train_graph(config, lambda: inputs.open_source(config, 0))
    with tf.compat.v1.Session(graph=tg.graph) as sess:
        sess.run(tg.init_op)
        tg.source.start(sess)
        for _ in range(3):
            sess.run(tg.train_op)
        with pytest.raises(tf.errors.OutOfRangeError):
            sess.run(tg.train_op)
    message = str(tg.source.ended(3))
    assert "dataset" in message and "after step 3" in message and ".repeat()" in message


def _spec_error(dataset) -> str:
    with pytest.raises(ConfigError) as info:
        InputSpec.from_element_spec(dataset.element_spec, "input test:fn")
    return str(info.value)


@pytest.mark.parametrize("make,pattern", [
    (lambda: tf.data.Dataset.range(4).batch(2),
     r"elements must be \(features dict, labels\) pairs.*ds\.map"),
    (lambda: tf.data.Dataset.from_tensor_slices((np.zeros((4, 3)), np.zeros(4))).batch(2),
     r"first part of each dataset element must be a non-empty dict"),
    (lambda: tf.data.Dataset.from_tensor_slices(({"x": np.zeros(4)}, np.zeros(4))),
     r"feature 'x' has no batch dimension.*\.batch"),
    (lambda: tf.data.Dataset.from_generator(
        lambda: iter([]), output_signature=({"x": tf.TensorSpec(None, tf.float32)},
                                            tf.TensorSpec([None], tf.int64))),
     r"feature 'x' has unknown rank"),
    (lambda: tf.data.Dataset.from_tensors(
        ({"x": tf.sparse.from_dense([[1.0, 0.0]])}, tf.constant([1]))),
     r"feature 'x' is SparseTensorSpec.*not a dense tensor"),
], ids=["not-a-pair", "features-not-a-dict", "unbatched", "unknown-rank", "sparse"])
def test_bad_element_specs_are_one_clear_error(make, pattern):
    with tf.Graph().as_default():
        assert re.search(pattern, _spec_error(make()))


def test_unknown_inner_dimensions_are_kept_as_none():
    with tf.Graph().as_default():
        ds = tf.data.Dataset.from_generator(
            lambda: iter([]), output_signature=(
                {"tokens": tf.TensorSpec([None, None], tf.int32)},
                tf.TensorSpec([None], tf.int64)))
        spec = InputSpec.from_element_spec(ds.element_spec, "input test:fn")
    assert spec.features == {"tokens": ("int32", (None,))}
    assert InputSpec.from_json(spec.to_json()) == spec
    with tf.Graph().as_default():
        features, _ = spec.placeholders()
        assert features["tokens"].shape.as_list() == [None, None]


# ---------------------------------------------------- Python generators -----

def _batches(count, fail_at=None, log=None):
    for i in range(count):
        if i == fail_at:
            raise RuntimeError(f"bad record {i}")
        if log is not None:
            log.append(i)
        yield {"x": np.full((2, 3), i, np.float32)}, np.full(2, i, np.int64)


def test_generator_is_read_ahead_on_a_background_thread():
    log: list[int] = []
    source = PythonSource(_batches(100, log=log), "test:gen", "input", 0, prefetch=3)
    with tf.Graph().as_default():
        features, labels = source.tensors()
    source.start()
    try:
        # Without any step asking, the reader fills the queue (3 batches) and
        # holds one more; the training thread is never the one reading.
        deadline = threading.Event()
        for _ in range(100):
            if len(log) >= 4:
                break
            deadline.wait(0.05)
        assert len(log) >= 4 and source._thread.is_alive()
        feed = source.feed(0)
        np.testing.assert_array_equal(feed[features["x"]], np.zeros((2, 3)))
        np.testing.assert_array_equal(source.feed(1)[labels], [1, 1])
    finally:
        source.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_generator_errors_keep_the_user_code_message(prefetch):
    source = PythonSource(_batches(10, fail_at=2), "test:gen", "input", 1,
                          prefetch=prefetch)
    with tf.Graph().as_default():
        source.tensors()
    source.start()
    source.feed(0)
    source.feed(1)
    with pytest.raises(UserCodeError) as info:
        source.feed(2)
    message = str(info.value)
    assert message.startswith("input: test:gen raised RuntimeError: bad record 2")
    assert "in _batches" in message and "distributed/inputs" not in message


@pytest.mark.parametrize("prefetch", [0, 2])
def test_generator_that_ends_keeps_the_message(prefetch):
    source = PythonSource(_batches(2), "test:gen", "input", 1, prefetch=prefetch)
    with tf.Graph().as_default():
        source.tensors()
    source.start()
    source.feed(5)
    source.feed(6)
    with pytest.raises(ConfigError, match=r"ran out of batches on worker 1 after step 7"
                                          r"; an input function must yield batches "
                                          r"forever"):
        source.feed(7)


def test_generator_whose_features_change_is_a_clear_error():
    def gen():
        yield {"x": np.zeros((2, 3), np.float32)}, np.zeros(2, np.int64)
        yield {"y": np.zeros((2, 3), np.float32)}, np.zeros(2, np.int64)
    source = PythonSource(gen(), "test:gen", "input", 0, prefetch=2)
    with tf.Graph().as_default():
        source.tensors()
    source.start()
    source.feed(0)
    with pytest.raises(ConfigError, match=r"yielded features \['y'\].*first batch had "
                                          r"\['x'\]"):
        source.feed(1)


# ------------------------------------------------ Estimator input_fn -----

def _range_dataset(n):
    return tf.data.Dataset.range(n).map(lambda i: ({"x": [i]}, i)).batch(1)


def estimator_params_input_fn(params):
    """An Estimator input_fn(params): sees all the data."""
    return _range_dataset(6).unbatch().batch(params["batch_size"] // 2)


def estimator_context_input_fn(mode, input_context):
    """An Estimator input_fn(mode, input_context): shards itself."""
    assert mode == "train"
    batch = input_context.get_per_replica_batch_size(4)
    return _range_dataset(8).unbatch().shard(
        input_context.num_input_pipelines, input_context.input_pipeline_id).batch(batch)


def _values(dataset) -> list[list[int]]:
    with tf.compat.v1.Session() as sess:
        nxt = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        out = []
        while True:
            try:
                out.append(sess.run(nxt)[1].tolist())
            except tf.errors.OutOfRangeError:
                return out


def test_estimator_input_fn_with_params_is_sharded_by_batch():
    adapted = from_estimator_input(estimator_params_input_fn)
    with tf.Graph().as_default():
        assert _values(adapted(0, 2, 4, {})) == [[0, 1], [4, 5]]
    with tf.Graph().as_default():
        assert _values(adapted(1, 2, 4, {})) == [[2, 3]]


def test_estimator_input_fn_with_input_context_shards_itself():
    adapted = from_estimator_input(estimator_context_input_fn)
    with tf.Graph().as_default():
        assert _values(adapted(1, 2, 99, {})) == [[1, 3], [5, 7]]


def not_an_estimator_input_fn(records, params):
    """Takes an argument no Estimator passes."""


def test_estimator_input_fn_of_the_wrong_shape_is_refused():
    with pytest.raises(ConfigError, match=r"takes records, which an Estimator never "
                                          r"passes"):
        from_estimator_input(not_an_estimator_input_fn)
