"""Restore for inference: checkpoint -> SavedModel, checked with stock TF."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from distributed.checkpoint import read_manifest
from distributed.errors import (CheckpointCorruptError, CheckpointNotFoundError,
                                ConfigError, StorageError)
from distributed.examples.digits import digits_eval_arrays
from distributed.model import PREDICT
from distributed.model.graphs import call_model_fn
from distributed.serving import job
from distributed.serving.export import list_versions, prune_versions
from tests.helpers.drivers import train_digits_in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = "distributed.examples.digits:mlp_model_fn"
CNN = "distributed.examples.digits:cnn_bn_model_fn"


def reference_outputs(coord, cfg, images):
    """Predict-mode outputs computed from the chief Session's current values."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 64])
        spec = call_model_fn(cfg, {"image": x}, None, PREDICT)
        variables = tf.compat.v1.global_variables()
        values = coord.sess.run({v.op.name: coord_var(coord, v.op.name) for v in variables})
        with tf.compat.v1.Session() as sess:
            for v in variables:
                v.load(values[v.op.name], sess)
            return sess.run(dict(spec.predictions), {x: images})


def coord_var(coord, name):
    return next(v for v in coord.tg.variables if v.op.name == name)


def serve(export_dir, images):
    loaded = tf.saved_model.load(export_dir)
    fn = loaded.signatures["serving_default"]
    return {k: v.numpy() for k, v in fn(image=tf.constant(images)).items()}


@pytest.mark.parametrize("model", [MLP, CNN])
def test_saved_model_matches_chief_session(storage, tmp_path, model):
    coord, cfg = train_digits_in_process(storage, "r", model)
    export = str(tmp_path / "export")
    result = job.restore_once(storage, "r", export, echo=lambda s: None)
    assert result.version == 40 and list_versions(export) == [40]
    images = digits_eval_arrays("test")[0]["image"][:50]
    got = serve(result.export_dir, images)
    want = reference_outputs(coord, cfg, images)
    for key in ("logits", "probabilities", "classes"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)
    rows = os.listdir(os.path.join(storage, "r", "exports"))
    assert len(rows) == 1 and rows[0].startswith("step-000000040.")


def test_trainable_policy_on_bn_cnn_is_refused_naming_the_cause(storage, tmp_path):
    coord, _ = train_digits_in_process(storage, "r", CNN, policy="trainable")
    assert any("moving_mean" in w for w in coord.warnings)
    export = tmp_path / "export"
    with pytest.raises(CheckpointNotFoundError) as info:
        job.restore_once(storage, "r", str(export), echo=lambda s: None)
    message = str(info.value)
    assert "cnn/conv_0/bn/moving_mean" in message and "policy: inference" in message
    assert list_versions(str(export)) == [] and os.listdir(export) == []


def flip_first_tensor(ckpt_dir):
    t = read_manifest(ckpt_dir).tensors[0]
    path = os.path.join(ckpt_dir, t.shard)
    with open(path, "r+b") as f:
        f.seek(t.offset)
        b = f.read(1)
        f.seek(t.offset)
        f.write(bytes([b[0] ^ 0xFF]))
    return t


def test_corrupt_newest_falls_back_and_step_fails(storage, tmp_path):
    coord, _ = train_digits_in_process(storage, "r", MLP)
    bad = flip_first_tensor(coord.store.layout.checkpoint_dir("serving", 40))
    said = []
    result = job.restore_once(storage, "r", str(tmp_path / "a"), echo=said.append)
    assert result.step == 20
    assert any("step 40 fails verification" in s for s in said)
    assert any("using serving checkpoint at step 20" in s for s in said)
    with pytest.raises(CheckpointCorruptError) as info:
        job.restore_once(storage, "r", str(tmp_path / "b"), step=40, echo=lambda s: None)
    assert bad.name in str(info.value) and bad.shard in str(info.value)
    assert not os.path.exists(tmp_path / "b") or os.listdir(tmp_path / "b") == []


def test_scope_map_restores_into_a_differently_scoped_graph(storage, tmp_path):
    train_digits_in_process(storage, "r", "tests.helpers.scoped_models:tower_model_fn")
    export = str(tmp_path / "export")
    with pytest.raises(CheckpointNotFoundError, match="serving/tower/dense/kernel"):
        job.restore_once(storage, "r", export,
                         model="tests.helpers.scoped_models:serving_model_fn",
                         echo=lambda s: None)
    result = job.restore_once(storage, "r", export, maps=["tower/=serving/tower/"],
                              model="tests.helpers.scoped_models:serving_model_fn",
                              echo=lambda s: None)
    images = digits_eval_arrays("test")[0]["image"][:5]
    reader = tf.train.load_checkpoint(os.path.join(
        storage, "r", "checkpoints", "serving", "step-000000040", "model.ckpt"))
    kernel = reader.get_tensor("tower/dense/kernel")
    bias = reader.get_tensor("tower/dense/bias")
    np.testing.assert_allclose(serve(result.export_dir, images)["logits"],
                               images @ kernel + bias, rtol=1e-5, atol=1e-5)


def test_best_by_metric(storage, tmp_path):
    train_digits_in_process(storage, "r", MLP, steps=(10, 20, 30))
    # The expected answer comes from the catalog's Parquet rows read with plain
    # pyarrow, not from the Catalog.best the restore job uses.
    rows = pq.read_table(os.path.join(storage, "r", "catalog")).to_pylist()
    losses = {r["step"]: dict(r["metrics"])["loss"] for r in rows if r["tier"] == "serving"}
    assert sorted(losses) == [10, 20, 30] and len(set(losses.values())) == 3
    for mode, pick in (("max", max), ("min", min)):
        want = pick(losses, key=losses.get)
        result = job.restore_once(storage, "r", str(tmp_path / mode), best=f"loss:{mode}",
                                  echo=lambda s: None)
        assert result.step == want, (mode, losses)
    # Not the newest by accident: the max-loss checkpoint is an older one.
    assert max(losses, key=losses.get) != 30, losses


def test_export_reads_under_a_lease_that_retention_respects(storage, tmp_path, monkeypatch):
    """The restore job takes its lease before it re-checks the catalog row, and
    holds it while it reads: retention run in the middle of the read drops the
    row but leaves the files, and the export completes."""
    from distributed.checkpoint import CheckpointStore, KeepLastN, Retention, lease
    from distributed.checkpoint.layout import RunLayout
    from distributed.serving import export as export_module

    train_digits_in_process(storage, "r", MLP)
    run_layout = RunLayout(storage, "r")
    step20 = run_layout.checkpoint_dir("serving", 20)
    seen = {}
    real_read_committed = export_module._read_committed
    real_read_verified = export_module.read_verified

    def read_committed(layout_, entry):
        seen["at_row_check"] = lease.live_leases(run_layout, entry.tier, entry.step)
        return real_read_committed(layout_, entry)

    def read_verified(ckpt_dir, *args, **kwargs):
        held = lease.live_leases(run_layout, "serving", 20)
        seen["while_reading"] = [json.load(open(p)) for p in held]
        # The writer's retention runs now: only step 40 may stay.
        store = CheckpointStore(storage, "r")
        seen["deleted"] = [e.step for e in store.apply_retention(Retention((KeepLastN(1),)))]
        seen["dir_after_retention"] = os.path.isdir(step20)
        return real_read_verified(ckpt_dir, *args, **kwargs)

    monkeypatch.setattr(export_module, "_read_committed", read_committed)
    monkeypatch.setattr(export_module, "read_verified", read_verified)
    result = job.restore_once(storage, "r", str(tmp_path / "e"), step=20,
                              echo=lambda s: None)
    assert result.step == 20 and list_versions(str(tmp_path / "e")) == [20]
    assert len(seen["at_row_check"]) == 1, seen  # leased before the row re-check
    (record,) = seen["while_reading"]
    assert record["holder"].endswith(f":{os.getpid()}") and record["expires"] > time.time()
    assert seen["deleted"] == [20] and seen["dir_after_retention"], seen
    # Released after the export; the next retention pass deletes the files.
    assert lease.live_leases(run_layout, "serving", 20) == []
    assert lease.deferred(run_layout) == [("serving", 20)]
    CheckpointStore(storage, "r").apply_retention(Retention((KeepLastN(1),)))
    assert not os.path.exists(step20) and lease.deferred(run_layout) == []


def test_saved_model_is_written_under_a_hidden_tmp_name_then_renamed(storage, tmp_path,
                                                                     monkeypatch):
    """What TF Serving watching <export> sees while the SavedModel is written:
    only a hidden tmp directory, never a half-written <version>/."""
    from distributed.checkpoint import layout as layout_module

    train_digits_in_process(storage, "r", MLP)
    export = str(tmp_path / "export")
    seen = []
    real_fsync_tree = layout_module.fsync_tree

    def fsync_tree(path):  # the last write before the rename
        if path.startswith(export):
            seen.append((path, sorted(os.listdir(export)), list_versions(export),
                         sorted(os.listdir(path))))
        return real_fsync_tree(path)

    monkeypatch.setattr(layout_module, "fsync_tree", fsync_tree)
    result = job.restore_once(storage, "r", export, echo=lambda s: None)
    assert len(seen) == 1, seen
    path, listing, versions, contents = seen[0]
    name = os.path.basename(path)
    assert name.startswith(".40") and layout_module.TMP_MARKER in name, name
    assert listing == [name] and versions == [], listing  # nothing a server would load
    assert "saved_model.pb" in contents and "variables" in contents
    assert result.export_dir == os.path.join(export, "40")
    assert os.listdir(export) == ["40"]  # renamed: the tmp name is gone
    assert "saved_model.pb" in os.listdir(result.export_dir)


def test_bad_inputs(storage, tmp_path):
    export = str(tmp_path / "export")
    with pytest.raises(CheckpointNotFoundError, match="run 'nope' not found"):
        job.restore_once(storage, "nope", export, echo=lambda s: None)
    train_digits_in_process(storage, "r", MLP)
    with pytest.raises(CheckpointNotFoundError, match="no committed serving checkpoint at step 7"):
        job.restore_once(storage, "r", export, step=7, echo=lambda s: None)
    with pytest.raises(ConfigError, match="is not CKPT_PREFIX=GRAPH_PREFIX"):
        job.restore_once(storage, "r", export, maps=["tower"], echo=lambda s: None)
    with pytest.raises(ConfigError, match="METRIC"):
        job.restore_once(storage, "r", export, best="loss:lowest", echo=lambda s: None)
    target = "/proc/no-export" if os.geteuid() == 0 else "/no-export"
    with pytest.raises(StorageError, match="is not writable"):
        job.restore_once(storage, "r", target, echo=lambda s: None)
    assert not os.path.exists(export) or os.listdir(export) == []


def test_empty_catalog(storage, tmp_path):
    coord, _ = train_digits_in_process(storage, "r", MLP)
    for e in coord.store.catalog.entries():
        coord.store.catalog.remove(e.step, e.tier)
    with pytest.raises(CheckpointNotFoundError, match="no committed serving checkpoint yet"):
        job.restore_once(storage, "r", str(tmp_path / "x"), echo=lambda s: None)


def test_prune_keeps_newest(tmp_path):
    for v in (1, 5, 9, 12):
        (tmp_path / str(v)).mkdir()
    assert prune_versions(str(tmp_path), 2) == [1, 5]
    assert list_versions(str(tmp_path)) == [9, 12]


def test_watch_exports_new_checkpoints_and_stops(storage, tmp_path):
    import threading
    coord, _ = train_digits_in_process(storage, "r", MLP, steps=(10,))
    export = str(tmp_path / "export")
    stop = threading.Event()
    said = []
    t = threading.Thread(target=job.watch, kwargs=dict(
        storage=storage, run="r", export=export, keep=1, poll_seconds=0.2,
        echo=said.append, stop=stop))
    t.start()
    try:
        _wait(lambda: list_versions(export) == [10])
        names = {v.op.name: v for v in coord.tg.variables}
        coord.save(20, "serving", coord.sess.run({n: names[n] for n in coord.serving_names}),
                   {"loss": 1.0})
        _wait(lambda: list_versions(export) == [20])
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert any("removed old versions [10]" in s for s in said)


def _wait(cond, timeout=60):
    import time
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


@pytest.mark.slow
def test_cli_errors_are_one_line(storage, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.restore", "--storage", storage,
                           "--run", "nope", "--export", str(tmp_path / "e")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: run 'nope' not found")
