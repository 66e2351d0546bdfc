"""Parameter servers (issue 23): the config, where the variables go, and a
real run with the tables on the servers whose checkpoints stock TensorFlow
reads, ``ckpt verify`` passes and the restore job exports.

(The servers' run ending with the replicated run's variables, resume
included, is in tests/test_model_state.py; a multi-node run with a server
killed mid-run in tests/test_ps_cluster.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.errors import ConfigError
from distributed.examples import wide_deep
from distributed.inputs.spec import InputSpec
from distributed.serving import job
from distributed.train.graph import build_train_graph
from distributed.train.ps import Placement
from tests.conftest import REPO_ROOT
from tests.helpers.ps import TABLE, WARM_VALUE, checkpoint_values, wide_deep_config
from tests.helpers.training import ckpt_prefix, run_train

PS_CONFIG = os.path.join(REPO_ROOT, "jobs", "configs", "wide_deep_ps.yaml")
SPEC = InputSpec({"user": ("int64", ()), "item": ("int64", ()),
                  "category": ("int64", ()), "dense": ("float32", (8,))},
                 ("int64", ()))


# ---------------------------------------------------------------- config -----

@pytest.mark.parametrize("fields,message", [
    ({"parameter_servers": -1}, "parameter_servers: expected an integer >= 0"),
    ({"parameter_servers": "2"}, "parameter_servers: expected an integer"),
    ({"parameter_servers": 2, "ps_cpus": 0}, "ps_cpus: expected a positive number"),
    ({"parameter_servers": 2, "ps_memory": "8GB!"}, "ps_memory: expected a positive size"),
    ({"parameter_servers": 2, "ps_memory": "8GiBs"}, "did you mean 'gib'?"),
    ({"parameter_servers": 2, "ps_resources": {"ps_node": 0}},
     "ps_resources.ps_node: expected a positive number"),
    ({"parameter_servers": 2, "ps_variables": ["emb("]},
     "ps_variables[0]: 'emb(' is not a valid regex"),
    ({"ps_variables": ["emb"]}, "ps_variables: set, but parameter_servers is 0"),
    ({"parameter_servers": 2, "storage": "s3://bucket/runs"},
     "an object store is not one yet"),
    ({"parameter_servers": 2, "eval": {"input": "a.b:c"}},
     "eval: evaluation reads the serving checkpoint's values in the coordinator"),
    ({"parameter_servers": 2, "steps_per_run": 4}, "steps_per_run: 4 with parameter"),
    ({"parameter_sever": 2}, "did you mean 'parameter_servers'?"),
], ids=lambda v: str(v)[:40])
def test_bad_parameter_server_config_is_one_line_naming_the_field(fields, message):
    with pytest.raises(ConfigError) as e:
        config_lib.from_dict(fields)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sizes_parse_and_survive_the_trip_to_the_actors():
    config = config_lib.from_dict({"parameter_servers": 2, "ps_memory": "1.5GiB",
                                   "ps_resources": {"ps_node": 1},
                                   "ps_variables": "wide/bias"})
    assert config.ps_memory == int(1.5 * 2**30)
    assert config.ps_variables == ["wide/bias"]
    assert config_lib.from_dict(config.to_dict()) == config
    assert config_lib.from_dict({"parameter_servers": 1, "ps_memory": 1000}).ps_memory \
        == 1000


def test_the_ps_example_config_loads():
    config = config_lib.load(PS_CONFIG, {})
    assert config.parameter_servers == 2 and config.optimizer.name == "adagrad"


# ------------------------------------------------------------ graph only -----

def _graph(servers=2, patterns=(), optimizer="adagrad", rank=0):
    cfg = wide_deep_config("unused", "graph", parameter_servers=servers,
                           ps_variables=list(patterns),
                           optimizer={"name": optimizer, "learning_rate": 0.1})
    return build_train_graph(cfg, SPEC, placement=Placement.of(cfg, rank=rank))


def test_partitioned_parts_and_their_slots_go_to_the_servers_spread_by_bytes():
    tg = _graph(patterns=[r"wide/bias$"])
    devices = {v.op.name: v.device for v in tg.variables}
    on_servers = {v.op.name for v in tg.server_variables}
    parts = [n for n in devices if "/part_" in n and not n.endswith("Adagrad")]
    assert len(parts) == 8  # the id table and the wide cross, 4 parts each
    for name in parts:
        assert devices[name].startswith("/job:ps/replica:0/task:"), name
        # Adagrad's accumulator is colocated with its part.
        assert devices[f"{name}/Adagrad"] == devices[name]
        assert {name, f"{name}/Adagrad"} <= on_servers
    assert devices["wide_deep/wide/bias"].startswith("/job:ps/")  # ps_variables
    # Everything else stays on the workers, replicated.
    assert not devices["wide_deep/deep/hidden_0/kernel"]
    assert "global_step" not in on_servers
    # Greedy by bytes: both servers hold an id-table half's worth.
    by_task = {}
    for v in tg.server_variables:
        task = v.device.split("task:")[1][0]
        by_task[task] = by_task.get(task, 0) + v.shape.num_elements()
    assert sorted(by_task) == ["0", "1"]
    assert max(by_task.values()) <= 1.2 * min(by_task.values()), by_task


def test_ps_variables_match_a_keras_weight_by_its_full_name():
    """A Keras layer makes its weight with ``tf.Variable(name="embeddings")``
    under its name scope (DeepCTR's ``sparse_emb_user``): the regex sees
    the name the variable gets, ``sparse_emb_user/embeddings``, as it does a
    ``get_variable``'s."""
    placement = Placement(2, ["^sparse_emb_", "^dense/kernel$"])
    with tf.Graph().as_default(), placement.scope():
        with tf.name_scope("sparse_emb_user"):
            table = tf.Variable(tf.zeros([4, 2]), name="embeddings")
        with tf.name_scope("sparse_emb_user"):  # a second layer of that name
            second = tf.Variable(tf.zeros([4, 2]), name="embeddings")
        kernel = tf.compat.v1.get_variable("dense/kernel", [2])
        other = tf.Variable(tf.zeros([3]), name="dense_1/kernel")
    assert second.op.name == "sparse_emb_user_1/embeddings"
    # Greedy by bytes, sized by their initial values: the second table goes to
    # the empty server.
    assert [placement.task_of(v) for v in (table, second, kernel, other)] == [0, 1, 0, None]
    assert table.device.startswith("/job:ps/replica:0/task:0") and not other.device


def test_a_ps_variables_regex_that_places_nothing_is_one_line_naming_it():
    with pytest.raises(ConfigError) as e:
        _graph(patterns=[r"wide/bias$", r"^embeddings"])
    message = str(e.value)
    assert message.startswith("ps_variables: '^embeddings' matches no variable of model "
                              "distributed.examples.wide_deep:wide_deep_model_fn")
    assert "wide_deep/deep/id_embedding," in message and "part_0" not in message
    assert "\n" not in message


def test_a_table_on_the_servers_with_a_dense_gradient_is_named_in_a_warning():
    cfg = wide_deep_config("unused", "graph", parameter_servers=2,
                           ps_variables=[r"hidden_0/(kernel|bias)$"])
    placement = Placement.of(cfg, rank=0)
    build_train_graph(cfg, SPEC, placement=placement)
    # The parts of the id table get the rows looked up; the dense kernel (a
    # matrix) its whole gradient; a bias (rank 1) is no table.
    assert placement.dense_tables == ["wide_deep/deep/hidden_0/kernel"]
    warning = placement.dense_gradient_warning()
    assert warning.startswith("parameter servers: the gradient of "
                              "wide_deep/deep/hidden_0/kernel is dense")
    assert not Placement.of(wide_deep_config("unused", "g", parameter_servers=2)
                            ).dense_gradient_warning()


def _runs(op) -> set[str]:
    """The ops a grouped op runs (its control inputs, through nested groups)."""
    seen, todo = set(), [op]
    while todo:
        for dep in todo.pop().control_inputs:
            if dep.name not in seen:
                seen.add(dep.name)
                todo.append(dep)
    return seen


def test_workers_initialize_only_the_replicated_variables():
    tg = _graph()
    served = {v.initializer.name for v in tg.server_variables}
    assert served and not served & _runs(tg.initializers.init_op)
    assert served <= _runs(tg.server_init_op)
    kernel = next(v for v in tg.variables if v.op.name.endswith("hidden_0/kernel"))
    assert kernel.initializer.name in _runs(tg.initializers.init_op)


def test_an_optimizer_with_step_wide_state_is_refused():
    with pytest.raises(ConfigError, match="optimizer: adam keeps state shared"):
        _graph(optimizer="adam")


# ---------------------------------------------------------- a real run -----

@pytest.mark.slow
@pytest.mark.ray
def test_ps_run_checkpoints_read_stock_verify_and_export(local_ray, storage, tmp_path):
    """The PS example config, smaller: the full checkpoint holds the id table
    as one logical tensor (the servers' parts as its slices), the serving one
    without Adagrad's slots; ``ckpt verify`` (the documented CLI) passes and
    the restore job's export serves the table the checkpoint holds."""
    config = config_lib.load(PS_CONFIG, {"storage": storage})
    config = config_lib.from_dict({
        **config.to_dict(), "steps": 60, "log_every": 30, "batch_size": 32,
        "model_params": {"hash_buckets": 20_000, "embedding_dim": 8, "partitions": 4,
                         "cross_buckets": 5000, "hidden": [16]},
        "checkpoint": {"serving_every": 30, "full_every": 60}})
    summary, lines = run_train(config)
    assert summary["steps"] == 60, lines
    full = checkpoint_values(storage, "wide-deep-ps", "full", 60)
    assert full[TABLE].shape == (20_000, 8) and f"{TABLE}/Adagrad" in full
    reader = tf.train.load_checkpoint(ckpt_prefix(storage, "wide-deep-ps", "serving", 60))
    shapes = reader.get_variable_to_shape_map()
    assert shapes[TABLE] == [20_000, 8] and f"{TABLE}/Adagrad" not in shapes
    # The servers wrote shards of their own: the coordinator's, then one each.
    entries = Catalog(RunLayout(storage, "wide-deep-ps")).entries()
    assert all(e.num_shards >= 3 for e in entries), [e.num_shards for e in entries]
    verified = subprocess.run(
        [sys.executable, "-m", "distributed.ckpt", "verify", "--storage", storage,
         "--run", "wide-deep-ps"], capture_output=True, text=True, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT}, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "0 of 3 checkpoint(s) bad" in verified.stdout, verified.stdout
    result = job.restore_once(storage, "wide-deep-ps", str(tmp_path / "export"),
                              echo=lambda s: None)
    served = tf.saved_model.load(result.export_dir).signatures["serving_default"]
    x, _ = wide_deep.click_arrays(256, 0, 0)
    out = served(**{k: tf.constant(v) for k, v in x.items()})["probability"].numpy()
    assert out.shape == (256,) and np.all((out > 0) & (out < 1))


@pytest.mark.slow
@pytest.mark.ray
def test_a_scaffold_init_fn_warm_starts_the_servers_tables_too(local_ray, storage):
    """A warm start (the scaffold's ``init_fn``) sets the tables on the servers,
    not only the coordinator's copies of them."""
    config = wide_deep_config(
        storage, "warm", model="tests.helpers.ps:warm_started_model_fn",
        parameter_servers=2, steps=2, log_every=2,
        optimizer={"name": "sgd", "learning_rate": 1e-9},
        checkpoint={"serving_every": 0, "full_every": 2})
    summary, lines = run_train(config)
    assert summary["steps"] == 2, lines
    table = checkpoint_values(storage, "warm", "full", 2)[TABLE]
    assert table.shape == (20_000, 8)
    np.testing.assert_allclose(table, WARM_VALUE, atol=1e-6)


@pytest.mark.ray
@pytest.mark.parametrize("fields,message", [
    ({"ps_cpus": 8}, "ps_cpus: 2 parameter servers x 8 CPU"),
    ({"ps_resources": {"ps_node": 1}}, "ps_resources.ps_node: 2 parameter servers x 1"),
    ({"ps_memory": "100TiB"}, "ps_memory: 102400.00 GiB per parameter server"),
], ids=["cpus", "resources", "memory"])
def test_servers_the_cluster_cannot_hold_fail_before_anything_starts(local_ray, storage,
                                                                     fields, message):
    from distributed.train import cluster
    config = wide_deep_config(storage, "too-big", parameter_servers=2, **fields)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cluster.check_resources(config)


def test_a_snapshot_of_a_servers_variables_stays_on_its_server():
    """Read, shadowed and left there: no byte of the table reaches rank 0 (the
    coordinator's ServerSaver writes the shadows); the rest is fetched."""
    from distributed.train.snapshot import VariableSnapshot
    tg = _graph()
    on_servers = {v.op.name for v in tg.server_variables}
    snapshot = VariableSnapshot(tg.variables, {"full": [v.op.name for v in tg.variables]},
                                remote=on_servers)
    graph = tg.graph
    for v in tg.server_variables:
        task = v.device.split("task:")[1][0]
        take = [op for op in graph.get_operations() if op.name.startswith("snapshot/")
                and op.type in ("ReadVariableOp", "AssignVariableOp", "VarHandleOp")
                and any(inp.op is v.op for inp in op.inputs)]
        assert take and all(op.device.startswith(f"/job:ps/replica:0/task:{task}")
                            for op in take), [(op.name, op.device) for op in take]
    reads, _ = snapshot._fetch["full"]
    assert not set(reads) & on_servers
    assert "wide_deep/deep/hidden_0/kernel" in reads


@pytest.mark.slow
@pytest.mark.ray
def test_the_last_saves_wait_for_the_one_in_flight_before_a_new_snapshot(local_ray,
                                                                         storage):
    """The coordinator reads the servers' snapshot after rank 0 handed the save
    off, then frees it: the last step's snapshot is taken only once the save in
    flight is done with the one before (same shadows), or it would be freed
    under the last saves."""
    import json

    from distributed.train import trainer
    from tests.helpers.fault_actors import SlowSavingCoordinator
    config = wide_deep_config(storage, "slow", parameter_servers=2, steps=40,
                              checkpoint={"serving_every": 40, "full_every": 20})
    os.makedirs(config.storage_path, exist_ok=True)
    with open(os.path.join(config.storage_path, "slow_saves.json"), "w") as f:
        json.dump({"20": 8}, f)
    lines: list[str] = []
    summary = trainer.train(config, echo=lines.append,
                            coordinator_cls=SlowSavingCoordinator)
    assert not [line for line in lines if "FAILED" in line], lines
    keys = {(e.tier, e.step) for e in Catalog(RunLayout(storage, "slow")).entries()}
    assert keys == {("full", 20), ("full", 40), ("serving", 40)}, (keys, lines)
    assert summary["steps"] == 40
