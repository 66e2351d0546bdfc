"""Public model code on parameter servers: DeepCTR's DeepFM (the model of
tests/test_thirdparty_deepctr.py, from :mod:`tests.helpers.deepctr_models`)
with its embedding tables on 2 ``ParameterServer`` actors.

The tables are Keras ``Embedding`` weights that DeepCTR names itself: the FM
and DNN part's ``sparse_emb_<feature>/embeddings`` (4 wide) and the linear
part's ``linear0sparse_emb_<feature>/embeddings`` (1 wide). DeepCTR also
makes a ``linearsparse_emb_<feature>/embeddings`` set its linear part never
reads (``get_linear_logit`` keeps only the dense inputs of that call): no
gradient, but a stock ``Saver`` of DeepCTR's graph restores it, so every
checkpoint holds it. One user-written regex, ``sparse_emb_``, puts all nine on
the servers; the dense layers, batch norm and ``linear/linear_kernel`` stay
replicated. (The regex needed a fix: the placement saw a Keras weight's name
relative to its name scope, ``embeddings``, and placed nothing.)

The run: Adagrad (Adam's step-wide state is refused with servers), 2
workers, no evaluation (refused with servers), through ``train()`` on a real
local Ray; its checkpoints are read by stock TensorFlow, ``ckpt verify``
passes, ``python -m jobs.restore`` exports, and the SavedModel's outputs equal
a stock ``Saver.restore`` of the serving checkpoint into DeepCTR's own graph.
With DeepFM's defaults every table has an L2 regularizer, so its gradient is
the whole table (dense), which the run warns of. The same model with dropout
off and no L2 (sparse gradients: the servers' sparse update) ends where a
replicated run ends.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import deepctr_models  # imports no DeepCTR

deepctr_models.import_deepctr()  # skips this module without DeepCTR

from distributed.checkpoint import Catalog, RunLayout  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.helpers.deepctr_models import (  # noqa: E402
    CITIES, ITEMS, USERS, click_rows, serve, stock_predictions)
from tests.helpers.drivers import export_last, two_worker_config  # noqa: E402
from tests.helpers.ps import checkpoint_values, max_difference  # noqa: E402
from tests.helpers.training import ckpt_prefix, progress_losses, run_train  # noqa: E402

MODELS = "tests.helpers.deepctr_models"
PS_VARIABLES = ["sparse_emb_"]
ADAGRAD = {"name": "adagrad", "learning_rate": 0.05}
ROWS = {"user": USERS, "item": ITEMS, "city": CITIES}
# Every table DeepFM makes, by name, and its shape.
TABLES = {f"{prefix}sparse_emb_{feature}/embeddings": (rows, width)
          for feature, rows in ROWS.items()
          for prefix, width in (("", 4), ("linear0", 1), ("linear", 1))}
TRAINED = {name for name in TABLES if not name.startswith("linearsparse")}


def ps_config(storage: str, run: str, steps: int, servers: int = 2, **overrides):
    """DeepFM on 2 workers (:func:`two_worker_config`, no eval) with its tables
    on ``servers`` parameter servers (0: replicated)."""
    if servers:
        overrides.update(parameter_servers=servers, ps_variables=PS_VARIABLES,
                         ps_cpus=0.5)
    return two_worker_config(MODELS, "deepfm_model_fn", "deepfm_input_fn", ADAGRAD,
                             storage, run, steps, **overrides)


# ------------------------------------------------------------ graph only ---

@pytest.mark.parametrize("l2", [None, 0.0], ids=["deepfm-l2", "no-l2"])
def test_one_regex_puts_every_deepctr_table_and_its_slot_on_the_servers(l2):
    from distributed.inputs.spec import InputSpec
    from distributed.train.graph import build_train_graph
    from distributed.train.ps import Placement
    cfg = ps_config("unused", "graph", steps=20, model_params={"l2_reg_embedding": l2})
    spec = InputSpec.from_batch(*click_rows(16, seed=0), "clicks")
    placement = Placement.of(cfg, rank=0)
    tg = build_train_graph(cfg, spec, placement=placement)
    on_servers = {v.op.name: v.device for v in tg.server_variables}
    slots = {f"{name}/Adagrad" for name in TRAINED}
    assert set(on_servers) == set(TABLES) | slots, sorted(on_servers)
    assert all(d.startswith("/job:ps/replica:0/task:") for d in on_servers.values())
    for slot in slots:  # Adagrad's accumulator lives with its table
        assert on_servers[slot] == on_servers[slot[:-len("/Adagrad")]]
    assert {d.split("task:")[1][0] for d in on_servers.values()} == {"0", "1"}
    assert not [v.op.name for v in tg.variables
                if v.op.name not in on_servers and v.device]
    # DeepFM's L2 regularizers read the whole tables: their gradients are
    # dense, which the coordinator warns of; without them, the rows looked up.
    if l2 is None:
        assert sorted(placement.dense_tables) == sorted(TRAINED)
        assert "embeddings_regularizer" in placement.dense_gradient_warning()
    else:
        assert placement.dense_tables == [] and not placement.dense_gradient_warning()


# ------------------------------------------------------------ end to end ---

STEPS = 60


@pytest.mark.slow
@pytest.mark.ray
def test_deepfm_with_tables_on_servers_trains_checkpoints_and_exports(local_ray, storage,
                                                                     tmp_path):
    run = "deepfm-ps"
    config = ps_config(storage, run, STEPS, log_every=STEPS // 3)
    summary, lines = run_train(config)
    print("\n".join(lines))
    assert summary["steps"] == STEPS, lines
    # DeepFM's defaults: L2 on the tables, so their gradients are dense.
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and "sparse_emb_user/embeddings" in warnings[0] \
        and "embeddings_regularizer" in warnings[0], lines
    losses = progress_losses(lines)
    assert len(losses) == 3 and losses[-1] < losses[0], lines

    # Stock TensorFlow reads every table whole, with its Adagrad slot in the
    # full checkpoint and without it in the serving one.
    full = checkpoint_values(storage, run, "full", STEPS)
    for name, shape in TABLES.items():
        assert full[name].shape == shape, name
    assert {f"{name}/Adagrad" for name in TRAINED} <= set(full)
    serving_prefix = ckpt_prefix(storage, run, "serving", STEPS)
    shapes = tf.train.load_checkpoint(serving_prefix).get_variable_to_shape_map()
    assert {name: tuple(shapes[name]) for name in TABLES} == TABLES
    assert not [name for name in shapes if name.endswith("Adagrad")], sorted(shapes)
    # The servers wrote shards of their own beside the coordinator's.
    entries = Catalog(RunLayout(storage, run)).entries()
    assert sorted((e.tier, e.step) for e in entries) == [
        ("full", STEPS), ("serving", STEPS // 2), ("serving", STEPS)]
    assert all(e.num_shards >= 3 for e in entries), [e.num_shards for e in entries]

    verified = subprocess.run(
        [sys.executable, "-m", "distributed.ckpt", "verify", "--storage", storage,
         "--run", run], capture_output=True, text=True, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT}, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "0 of 3 checkpoint(s) bad" in verified.stdout, verified.stdout

    export = tmp_path / "export"
    export_last(storage, run, str(export))
    x, _ = click_rows(200, seed=99)
    got = serve(str(export / str(STEPS)), x)
    want = stock_predictions(serving_prefix, x)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6), np.abs(got - want).max()


@pytest.mark.slow
@pytest.mark.ray
def test_deepfm_with_tables_on_servers_ends_with_the_replicated_runs_variables(
        local_ray, storage):
    """Same seeds, same batches, dropout off (DeepFM's own ``dnn_dropout``, a
    model param here; ``keras_seed`` for the one initializer DeepFM leaves
    unseeded): the tables rank 0 updates on the servers end where every
    worker's replicated tables end, and so does every other variable
    (batch-norm statistics, Adagrad's accumulators), within 1e-4."""
    steps = 20
    common = {"model_params": {"dnn_dropout": 0.0, "keras_seed": 0, "l2_reg_embedding": 0.0},
              "log_every": steps,
              "checkpoint": {"serving_every": steps, "full_every": steps}}
    for servers, run in ((0, "replicated"), (2, "servers")):
        summary, lines = run_train(ps_config(storage, run, steps, servers, **common))
        assert summary["steps"] == steps, lines
    shards = {run: [e.num_shards for e in Catalog(RunLayout(storage, run)).entries()]
              for run in ("replicated", "servers")}
    assert min(shards["servers"]) >= 3 > max(shards["replicated"]), shards
    replicated = checkpoint_values(storage, "replicated", "full", steps)
    served = checkpoint_values(storage, "servers", "full", steps)
    # The servers' tables were updated: Adagrad's accumulators (0.1 at first).
    for name in TRAINED:
        assert np.abs(served[f"{name}/Adagrad"] - 0.1).max() > 1e-3, name
    difference, name = max_difference(replicated, served)
    print(f"largest difference {difference:.2g} in {name}")
    assert difference < 1e-4, (name, difference)
