"""Replicated model state: every non-trainable variable a train step writes
stays identical on every worker, combined as its ``aggregation`` declares.

Worker k of 2 sees only ids ≡ k mod 2 (:mod:`tests.helpers.state_models`), so a
counter that each worker kept for itself would count half of the examples
(and differ between replicas). The graph-level tests build real graphs; the
Ray tests train 2 real workers and read each replica and the full checkpoint
with stock TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import RunLayout
from distributed.errors import ConfigError
from distributed.inputs.spec import InputSpec
from distributed.train import state
from distributed.train.graph import build_train_graph
from tests.helpers import state_models
from tests.helpers.drivers import actor_group

MODEL = "tests.helpers.state_models:counter_model_fn"
INPUT = "tests.helpers.state_models:ids_input_fn"
SPEC = InputSpec({"id": ("int64", ())}, ("int64", ()))
BATCH = 16
COUNTERS = {f"state/{name}" for name in state_models.COUNTERS}
REF = f"state/{state_models.REF_COUNTER}"


def make_config(**overrides) -> config_lib.TrainConfig:
    data = {"model": MODEL, "input": INPUT, "batch_size": BATCH, "workers": 2,
            "cpus_per_worker": 0.5, "optimizer": {"name": "sgd", "learning_rate": 0.1}}
    data.update(overrides)
    return config_lib.from_dict(data)


# ------------------------------------------------------------ graph only -----

@pytest.mark.parametrize("steps_per_run,params,expected", [
    (1, {"ref": True}, COUNTERS | {REF}),
    (4, {}, COUNTERS)], ids=["one-step", "steps-per-run-4"])
def test_every_kind_of_write_makes_its_variable_model_state(steps_per_run, params,
                                                            expected):
    """Scatters, ScatterNd, assigns, a write inside tf.cond, a reference
    variable's ScatterAdd; bool and integer variables too. The trainable
    weight is not state."""
    tg = build_train_graph(make_config(model_params=params), SPEC,
                           steps_per_run=steps_per_run)
    assert {v.op.name for v in tg.model_state} == expected


def test_ops_that_build_a_tensor_are_not_writes():
    with tf.Graph().as_default():
        v = tf.compat.v1.get_variable("v", [4], use_resource=True)
        pure = [tf.scatter_nd([[1]], [1.0], [4]),
                tf.tensor_scatter_nd_add(tf.zeros([4]), [[1]], [1.0]),
                tf.raw_ops.ScatterNdNonAliasingAdd(input=tf.zeros([4]), indices=[[1]],
                                                   updates=[1.0])]
        assert not any(state.is_write(t.op) for t in pure)
        write = tf.compat.v1.scatter_max(v, [1], [2.0])
        assert [op.type for op in state.step_writes([write])["v"]] == ["ResourceScatterMax"]


def test_calls_write_the_variables_their_bodies_write_not_those_they_read():
    with tf.Graph().as_default():
        a, b, c = (tf.compat.v1.get_variable(n, [3], trainable=False) for n in "abc")
        cond = tf.cond(tf.compat.v1.placeholder(tf.bool, []),
                       lambda: tf.group(a.assign_add(b.read_value())),
                       lambda: tf.group(c.read_value()))

        @tf.function
        def call():
            c.assign(b + 1.0)
            return a.read_value()

        def body(i):
            with tf.control_dependencies([b.scatter_add(tf.IndexedSlices(
                    a.read_value()[:1], tf.constant([0])))]):
                return i + 1

        loop = tf.compat.v1.while_loop(lambda i: i < 3, body, [0])
        assert set(state.step_writes([cond])) == {"a"}
        assert set(state.step_writes([call()])) == {"c"}
        assert set(state.step_writes([loop])) == {"b"}


@pytest.mark.parametrize("bad,match", [
    ("string", r"^model: tests\.helpers\.state_models:counter_model_fn: variable "
               r"'state/bad' \(string, aggregation NONE\) .* cannot be exchanged "
               r".*LOCAL_VARIABLES"),
    ("bool", r"^model: tests\.helpers\.state_models:counter_model_fn: variable "
             r"'state/bad' \(bool, aggregation SUM\) .* workers cannot add bool values; "
             r"declare it with aggregation=tf\.VariableAggregation\.ONLY_FIRST_REPLICA")])
def test_an_aggregation_the_dtype_cannot_take_is_one_line_naming_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_train_graph(make_config(model_params={"bad": bad}), SPEC)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------- Ray -----

def id_counts(rank: int, steps: int) -> np.ndarray:
    """How often worker ``rank`` saw each id in ``steps`` steps."""
    batches = state_models.ids_input_fn(rank, 2, BATCH, {})
    ids = np.concatenate([next(batches)[0]["id"] for _ in range(steps)])
    return np.bincount(ids, minlength=state_models.NUM_IDS)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("steps,steps_per_run,params", [
    (200, 1, {"ref": True}), (200, 8, {})], ids=["one-step", "steps-per-run-8"])
def test_replicas_agree_and_counters_count_as_declared(local_ray, storage, steps,
                                                       steps_per_run, params):
    config = make_config(storage=storage, run="state", steps=steps,
                         steps_per_run=steps_per_run, model_params=params,
                         checkpoint={"serving_every": 0, "full_every": steps})
    with actor_group(config) as (_, workers, _, _, initial):
        ray.get([w.train.remote(steps) for w in workers])
        lead, other = ray.get([w.variables.remote() for w in workers])
        ray.get(workers[0].finish.remote())
    for name in lead:  # every variable: each worker's copy is the same
        np.testing.assert_array_equal(other[name], lead[name], err_msg=name)
    assert not np.array_equal(lead["w"], initial["w"])  # it trained

    prefix = os.path.join(RunLayout(storage, "state").checkpoint_dir("full", steps),
                          "model.ckpt")
    saved = tf.train.load_checkpoint(prefix)
    even, odd = id_counts(0, steps), id_counts(1, steps)
    assert even[1::2].sum() == odd[0::2].sum() == 0
    assert even.sum() == odd.sum() == steps * BATCH  # 3,200 each at 200 steps
    expected = {  # SUM: every worker's examples; ONLY_FIRST_REPLICA: rank 0's
        "scatter_add_sum": even + odd, "scatter_nd_add_sum": even + odd,
        "assign_add_sum": 2 * steps * BATCH, "assign_sum": 2 * steps * BATCH,
        "cond_assign_add_sum": 2 * steps * BATCH,
        "scatter_add_first": even, "scatter_update_first": even > 0,
        # MEAN and NONE: the mean of the workers' new values
        "scatter_add_mean": (even + odd) / 2, "scatter_add_none": (even + odd) / 2}
    if params.get("ref"):
        expected[state_models.REF_COUNTER] = even + odd
    for name, value in expected.items():
        name = f"state/{name}"
        np.testing.assert_array_equal(saved.get_tensor(name), value, err_msg=name)
        np.testing.assert_array_equal(lead[name], value, err_msg=name)
    assert saved.get_tensor("state/scatter_add_sum").sum() == 2 * steps * BATCH
    assert saved.get_tensor("state/assign_add_sum").dtype == np.int64


# ------------------------------------------ parameter servers (issue 23) -----

@pytest.mark.ray
@pytest.mark.slow
def test_parameter_server_run_ends_with_the_replicated_runs_variables(local_ray,
                                                                     tmp_path):
    """20,000 rows, 200 steps: the tables on 2 parameter servers (updated once
    a step by rank 0, read remotely) end where the replicated run's tables
    end, and so does every other variable, within 1e-4. The servers' run
    stops at step 120 and resumes (its tables restored on the servers from
    the full checkpoint), so the resume is checked on the way, and so is the
    serving checkpoint at step 120 made again (as when a failure lost it)."""
    import shutil

    from distributed.checkpoint import Catalog, RunLayout
    from tests.helpers.ps import checkpoint_values, max_difference, wide_deep_config
    storage = str(tmp_path)
    common = {"steps": 200, "log_every": 40,
              "checkpoint": {"serving_every": 40, "full_every": 40}}
    from distributed.train.trainer import train as trainer_run
    trainer_run(wide_deep_config(storage, "replicated", **common), echo=lambda _: None)
    lines: list[str] = []
    trainer_run(wide_deep_config(storage, "servers", parameter_servers=2,
                                 **{**common, "steps": 120}), echo=lines.append)
    # Rank 0 died after the full checkpoint at 120 committed, before the serving one.
    layout = RunLayout(storage, "servers")
    Catalog(layout).remove(120, "serving")
    shutil.rmtree(layout.checkpoint_dir("serving", 120))
    trainer_run(wide_deep_config(storage, "servers", parameter_servers=2, **common),
                echo=lines.append)
    assert any("resuming run 'servers' from its full checkpoint at step 120" in line
               for line in lines), lines
    assert any(line.startswith("re-created the serving checkpoint at step 120")
               for line in lines), lines
    # Made by rank 0 from the values the servers restored: the table, no slots.
    remade = checkpoint_values(storage, "servers", "serving", 120)
    full = checkpoint_values(storage, "servers", "full", 120)
    assert "wide_deep/deep/id_embedding" in remade
    assert not [n for n in remade if n.endswith("/Adagrad")], sorted(remade)
    for name, value in remade.items():
        np.testing.assert_array_equal(value, full[name], err_msg=name)
    for step in (120, 200):
        replicated = checkpoint_values(storage, "replicated", "full", step)
        served = checkpoint_values(storage, "servers", "full", step)
        assert replicated["wide_deep/deep/id_embedding"].shape == (20_000, 8)
        difference, name = max_difference(replicated, served)
        assert difference < 1e-4, (step, name, difference)
