"""Models and inputs whose ops fail at step time, or whose optimizer breaks
the global-step contract: what tests/test_user_errors.py runs."""

import itertools

import numpy as np
import tensorflow as tf

from distributed.model import ModelSpec, check_mode

ROWS = 100
BAD_STEP = 26  # the first batch with an id outside the table


def table_model_fn(features, labels, mode, params):
    check_mode(mode, labels)
    table = tf.compat.v1.get_variable("ids/table", [ROWS, 8])
    rows = tf.nn.embedding_lookup(table, features["id"])
    logits = tf.compat.v1.layers.dense(rows, 2, name="head")
    predictions = {"class": tf.argmax(logits, 1)}
    if mode == "predict":
        return ModelSpec(predictions=predictions)
    loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, logits)
    return ModelSpec(loss=loss, predictions=predictions)


def leaving_ids_input_fn(worker_index, num_workers, batch_size, params):
    """Ids in [0, ROWS) until step BAD_STEP, where worker 1's leave the table."""
    rng = np.random.default_rng(worker_index)
    for step in itertools.count(1):
        ids = rng.integers(0, ROWS, batch_size)
        if step >= BAD_STEP and worker_index == num_workers - 1:
            ids[3] = ROWS + 7
        yield {"id": ids.astype(np.int64)}, (ids % 2).astype(np.int64)


class StepIgnoringOptimizer(tf.compat.v1.train.GradientDescentOptimizer):
    """Hand-written optimizers often apply the update and drop global_step."""

    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        return super().apply_gradients(grads_and_vars, global_step=None, name=name)


def step_ignoring_optimizer(learning_rate, params):
    return StepIgnoringOptimizer(learning_rate)


def fixed_optimizer(learning_rate, params):
    from distributed.train.optimizers import advancing_global_step
    return advancing_global_step(StepIgnoringOptimizer(learning_rate))
