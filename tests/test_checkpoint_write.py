"""Writing: stock-TF round trip, manifest agrees with TF's index, sharding."""

import os

import crc32c
import numpy as np
import pytest
import tensorflow as tf

from distributed.checkpoint import (CheckpointStore, CheckpointWriter, SelectionSpec,
                                    read_manifest, select_variables, session_config)
from distributed.checkpoint.sharding import assign_shards, default_num_shards
from distributed.checkpoint.tf_index import mask_crc, read_index, unmask_crc
from distributed.errors import CheckpointExistsError, StorageError
from tests.conftest import build_tiny_model


def save(model, storage, spec, step=10, tier="serving", shards=None, **kw):
    vs, _ = select_variables(model.graph, spec, [model.outputs])
    writer = CheckpointWriter(vs, num_shards=shards)
    store = CheckpointStore(storage, "run", **kw)
    store.open()
    entry = store.save(writer, model.sess, step, tier, spec.to_json(), {"loss": 0.5})
    return store, entry, vs


def test_round_trip_is_a_stock_tf_checkpoint(tiny_model, storage):
    spec = SelectionSpec("inference")
    store, entry, vs = save(tiny_model, storage, spec, shards=3)
    prefix = os.path.join(store.checkpoint_dir(entry), "model.ckpt")
    reader = tf.train.load_checkpoint(prefix)
    listed = dict(tf.train.list_variables(prefix))
    values = tiny_model.sess.run({v.op.name: v for v in vs})
    assert set(listed) == set(values)
    for name, value in values.items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)
    # A plain Saver restores it into a freshly built copy of the model.
    fresh = build_tiny_model(seed=7)
    with fresh.graph.as_default():
        by_name = {v.op.name: v for v in fresh.variables if v.op.name in values}
        tf.compat.v1.train.Saver(var_list=by_name).restore(fresh.sess, prefix)
    for name, value in values.items():
        np.testing.assert_array_equal(fresh.sess.run(by_name[name]), value)
    fresh.sess.close()
    # Exactly K data shards, one index, the manifest, and no .meta by default.
    files = sorted(os.listdir(store.checkpoint_dir(entry)))
    assert files == ["manifest.parquet", "model.ckpt.data-00000-of-00003",
                     "model.ckpt.data-00001-of-00003", "model.ckpt.data-00002-of-00003",
                     "model.ckpt.index"]
    assert entry.num_shards == 3 and entry.num_tensors == len(values)


def test_manifest_agrees_with_tf_index_bytes(tiny_model, storage):
    store, entry, _ = save(tiny_model, storage, SelectionSpec("all"), shards=2)
    ckpt = store.checkpoint_dir(entry)
    manifest = read_manifest(ckpt)
    index = {e.name: e for e in read_index(os.path.join(ckpt, "model.ckpt.index"))}
    reader = tf.train.load_checkpoint(os.path.join(ckpt, "model.ckpt"))
    assert {t.name for t in manifest.tensors} == set(index)
    for t in manifest.tensors:
        e = index[t.name]
        assert (t.offset, t.length) == (e.offset, e.size)
        assert t.shard == f"model.ckpt.data-{e.shard_id:05d}-of-00002"
        with open(os.path.join(ckpt, t.shard), "rb") as f:
            f.seek(t.offset)
            raw = f.read(t.length)
        assert crc32c.crc32c(raw) == t.crc32c
        expected = reader.get_tensor(t.name)
        assert t.dtype == expected.dtype.name and t.shape == expected.shape
        np.testing.assert_array_equal(np.frombuffer(raw, expected.dtype).reshape(expected.shape),
                                      expected)
    # The checksum chain: row file name -> row -> manifest -> whole index.
    index_bytes = open(os.path.join(ckpt, "model.ckpt.index"), "rb").read()
    manifest_bytes = open(os.path.join(ckpt, "manifest.parquet"), "rb").read()
    assert manifest.index_crc32c == crc32c.crc32c(index_bytes)
    assert entry.manifest_crc32c == crc32c.crc32c(manifest_bytes)
    row = store.catalog.committed_keys()[10, "serving"]
    row_bytes = open(os.path.join(store.catalog.directory, row), "rb").read()
    assert row == f"step-000000010.serving.{crc32c.crc32c(row_bytes):08x}.parquet"
    meta = manifest.metadata
    assert meta["schema_version"] == "3" and meta["tier"] == "serving"
    assert meta["step"] == "10" and meta["run"] == "run" and meta["tf_version"] == tf.__version__
    assert "created_at" in meta and '"policy": "all"' in meta["selection"]
    trainable = {t.name: t.trainable for t in manifest.tensors}
    assert trainable["tower/dense/kernel"] and not trainable["tower/bn/moving_mean"]


def test_crc_masking_round_trips():
    for value in (0, 1, 0xFFFFFFFF, 0x12345678):
        assert unmask_crc(mask_crc(value)) == value


def test_meta_graph_only_when_asked(tiny_model, storage):
    vs, _ = select_variables(tiny_model.graph, SelectionSpec("all"))
    writer = CheckpointWriter(vs, save_meta_graph=True)
    store = CheckpointStore(storage, "run")
    store.open()
    entry = store.save(writer, tiny_model.sess, 1, "full", "{}")
    assert "model.ckpt.meta" in os.listdir(store.checkpoint_dir(entry))


def test_same_step_twice_is_refused(tiny_model, storage):
    store, _, vs = save(tiny_model, storage, SelectionSpec(policy="inference"))
    writer = CheckpointWriter(vs)
    with pytest.raises(CheckpointExistsError, match="already has a committed serving"):
        store.save(writer, tiny_model.sess, 10, "serving", "{}")


def test_unwritable_storage_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/definitely-not-writable"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro)
    with pytest.raises(StorageError, match="is not writable.*pass a writable"):
        CheckpointStore(target, "run").open()


def test_bad_run_name_is_a_clear_error(storage):
    with pytest.raises(StorageError, match="run name '../x' is not valid"):
        CheckpointStore(storage, "../x")


def test_failed_write_leaves_nothing_and_next_save_works(tiny_model, storage):
    vs, _ = select_variables(tiny_model.graph, SelectionSpec())
    writer = CheckpointWriter(vs)
    store = CheckpointStore(storage, "run")
    store.open()
    tier_dir = store.layout.tier_dir("serving")
    os.chmod(tier_dir, 0o500)  # root ignores modes: also fail through a hook
    failing = CheckpointStore(storage, "run", on_phase=_fail_at("tensors_written"))
    try:
        with pytest.raises(StorageError, match="Nothing was committed"):
            failing.save(writer, tiny_model.sess, 5, "serving", "{}")
    finally:
        os.chmod(tier_dir, 0o755)
    assert os.listdir(tier_dir) == []
    assert store.catalog.entries() == []
    assert store.save(writer, tiny_model.sess, 5, "serving", "{}").step == 5


def _fail_at(phase):
    def hook(name):
        if name == phase:
            raise OSError(28, "No space left on device")
    return hook


@pytest.mark.parametrize("sizes, k", [
    ({"a": 100, "b": 90, "c": 10, "d": 5}, 2),
    ({f"t{i}": (i + 1) * 1000 for i in range(30)}, 4),
    ({"big": 10**9, "s1": 1, "s2": 1}, 3),
    ({"only": 7}, 5),
])
def test_assign_shards_balances_bytes(sizes, k):
    assignment = assign_shards(sizes, k)
    used = sorted(set(assignment.values()))
    assert used == list(range(min(k, len(sizes))))
    loads = [sum(s for n, s in sizes.items() if assignment[n] == i) for i in used]
    # LPT bound: max load <= mean + largest item.
    assert max(loads) <= sum(sizes.values()) / len(used) + max(sizes.values())
    assert assign_shards(sizes, k) == assignment  # deterministic


@pytest.mark.parametrize("total, tensors, expected", [
    (0, 1, 1), (10 * 2**20, 40, 1), (2**30, 40, 4), (2**30, 2, 2), (100 * 2**30, 100, 16),
])
def test_default_num_shards(total, tensors, expected):
    assert default_num_shards(total, tensors) == expected


def test_session_config_has_shard_devices():
    config = session_config(4)
    assert config.device_count["CPU"] == 4
    assert config.inter_op_parallelism_threads >= 4
