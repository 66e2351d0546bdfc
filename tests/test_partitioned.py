"""Partitioned variables are one logical tensor on disk (issue 11): written in
slices as TensorFlow's Saver writes them, a manifest row per slice, stock
restore into any partitioning, and clear errors for layouts that do not fit."""

import os
import random
import re
import warnings

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from distributed.checkpoint import (CheckpointStore, CheckpointWriter, SelectionSpec,
                                    VariableInfo, read_manifest, select,
                                    select_variables, session_config, verify_checkpoint)
from distributed.checkpoint import sharding
from distributed.checkpoint.slices import uncovered
from distributed.checkpoint.tf_index import decode_slice_key, read_index
from distributed.checkpoint.verify import read_verified
from distributed.checkpoint.writer import ShardImbalanceWarning
from distributed.errors import (ManifestError, PartitionMismatchError, SelectionError,
                                SliceLayoutError)
from distributed.train.graph import VariableLoader
from tests.helpers.damage import flip

SHAPES = {"emb": [10, 4], "emb2": [5, 7], "w": [3]}


def build(parts=4, parts2=3, ema=False):
    """A graph: ``emb`` in ``parts`` row blocks (0: whole), ``emb2`` in
    ``parts2`` column blocks, ``w`` whole; a Session with 3 shard devices."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)
        fixed = tf.compat.v1.fixed_size_partitioner
        tf.compat.v1.get_variable("emb", SHAPES["emb"],
                                  partitioner=fixed(parts) if parts else None)
        tf.compat.v1.get_variable("emb2", SHAPES["emb2"],
                                  partitioner=fixed(parts2, axis=1) if parts2 else None)
        tf.compat.v1.get_variable("w", SHAPES["w"])
        if ema:
            tf.train.ExponentialMovingAverage(0.5).apply(
                tf.compat.v1.trainable_variables())
        sess = tf.compat.v1.Session(config=session_config(3))
        sess.run(tf.compat.v1.global_variables_initializer())
    return graph, sess


def logical(graph, sess, name):
    """A variable's whole value, its parts put together."""
    parts = [v for v in graph.get_collection("variables")
             if re.fullmatch(re.escape(name) + r"(/part_\d+)?", v.op.name)]
    whole = np.zeros(SHAPES[name], np.float32)
    for v, value in zip(parts, sess.run(parts)):
        info = v._save_slice_info
        if info is None:
            return value
        whole[tuple(slice(o, o + s) for o, s in zip(info.var_offset, info.var_shape))] = value
    return whole


def save(graph, sess, storage, variables=None, shards=3, step=1):
    writer = CheckpointWriter(variables or list(graph.get_collection("trainable_variables")),
                              num_shards=shards)
    store = CheckpointStore(storage, "run")
    store.open()
    entry = store.save(writer, sess, step, "serving", "{}")
    return store.checkpoint_dir(entry), entry


@pytest.fixture
def written(storage):
    graph, sess = build()
    ckpt, entry = save(graph, sess, storage)
    values = {n: logical(graph, sess, n) for n in SHAPES}
    sess.close()
    return ckpt, entry, values


def test_partitioned_variables_are_one_logical_tensor(written):
    ckpt, entry, values = written
    prefix = os.path.join(ckpt, "model.ckpt")
    assert dict(tf.train.list_variables(prefix)) == SHAPES
    reader = tf.train.load_checkpoint(prefix)
    for name, value in values.items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)
    # A stock Saver restores into the same partitioning, another one, or none.
    for parts, parts2 in ((4, 3), (3, 2), (0, 0)):
        graph, sess = build(parts, parts2)
        with graph.as_default():
            tf.compat.v1.train.Saver().restore(sess, prefix)
        for name, value in values.items():
            np.testing.assert_array_equal(logical(graph, sess, name), value)
        sess.close()
    assert entry.num_tensors == 3 and read_manifest(ckpt).num_tensors == 3


def test_min_max_partitioner_tables_restore_into_fixed_parts(storage):
    graph = tf.Graph()
    with graph.as_default():
        table = tf.compat.v1.get_variable(
            "emb", SHAPES["emb"], partitioner=tf.compat.v1.min_max_variable_partitioner(
                max_partitions=3, min_slice_size=32))
        sess = tf.compat.v1.Session(config=session_config(3))
        sess.run(tf.compat.v1.global_variables_initializer())
    assert len(list(table)) == 3
    ckpt, _ = save(graph, sess, storage, list(table))
    value = logical(graph, sess, "emb")
    sess.close()
    graph, sess = build(2, 0)
    with graph.as_default():
        tf.compat.v1.train.Saver(var_list=[v for v in graph.get_collection("variables")
                                           if v.op.name.startswith("emb/")]).restore(
            sess, os.path.join(ckpt, "model.ckpt"))
    np.testing.assert_array_equal(logical(graph, sess, "emb"), value)
    sess.close()


def test_manifest_has_a_row_per_slice_matching_the_index(written):
    ckpt, _, values = written
    manifest = read_manifest(ckpt)
    assert manifest.metadata["schema_version"] == "3"
    rows = manifest.by_name()
    assert [r.slice for r in rows["emb"]] == ["0,3:0,4", "3,3:0,4", "6,2:0,4", "8,2:0,4"]
    assert [r.slice for r in rows["emb2"]] == ["0,5:0,3", "0,5:3,2", "0,5:5,2"]
    assert [r.slice for r in rows["w"]] == [None]
    assert all(r.shape == (10, 4) and r.trainable for r in rows["emb"])
    index = {(e.name, e.slice): e for e in read_index(os.path.join(ckpt, "model.ckpt.index"))}
    assert len(index) == len(manifest.tensors) == 8
    for r in manifest.tensors:
        e = index[r.name, None if r.slice is None else r.extents]
        assert (r.shard, r.offset, r.length, r.crc32c) == (
            f"model.ckpt.data-{e.shard_id:05d}-of-00003", e.offset, e.size, e.crc32c)
        with open(os.path.join(ckpt, r.shard), "rb") as f:
            f.seek(r.offset)
            raw = f.read(r.length)
        assert crc32c.crc32c(raw) == r.crc32c
        block = values[r.name][tuple(slice(s, s + n) for s, n in r.extents)]
        assert raw == block.tobytes()  # the slice's bytes are its block, C order
    # The verified reader puts the slices together (emb2's are not contiguous).
    got = read_verified(ckpt, manifest, list(SHAPES), np.dtype)
    for name, value in values.items():
        np.testing.assert_array_equal(got[name], value)


def test_slices_spread_over_the_shards_by_bytes(storage):
    """A table in 8 equal parts and K=4: every shard gets two parts."""
    graph = tf.Graph()
    with graph.as_default():
        table = tf.compat.v1.get_variable(
            "table", [64, 16], partitioner=tf.compat.v1.fixed_size_partitioner(8))
        small = tf.compat.v1.get_variable("small", [2])
        sess = tf.compat.v1.Session(config=session_config(4))
        sess.run(tf.compat.v1.global_variables_initializer())
    ckpt, _ = save(graph, sess, storage, list(table) + [small], shards=4)
    sess.close()
    slices_per_shard = {}
    for r in read_manifest(ckpt).tensors:
        if r.name == "table":
            slices_per_shard[r.shard] = slices_per_shard.get(r.shard, 0) + 1
    assert sorted(slices_per_shard.values()) == [2, 2, 2, 2]
    sizes = [os.path.getsize(os.path.join(ckpt, s)) for s in slices_per_shard]
    assert max(sizes) - min(sizes) <= 8  # balanced to the small variable's bytes


def test_serve_ema_mapping_saves_averages_as_slices(storage):
    """The coordinator's serving mapping {part name: its average}."""
    graph, sess = build(ema=True)
    with graph.as_default():
        for v in tf.compat.v1.trainable_variables():
            sess.run(v.assign_add(tf.ones_like(v)))
    by_name = {v.op.name: v for v in graph.get_collection("variables")}
    mapping = {n: by_name[n + "/ExponentialMovingAverage"]
               for n in by_name if n.startswith(("emb/part_", "emb2/part_"))
               and not n.endswith("Average")}
    ckpt, _ = save(graph, sess, storage, mapping)
    averages = {}
    for name in ("emb", "emb2"):
        parts = sorted((n for n in mapping if n.startswith(name + "/")),
                       key=lambda n: int(n.rsplit("_", 1)[1]))
        averages[name] = np.concatenate(sess.run([mapping[n] for n in parts]),
                                        axis=0 if name == "emb" else 1)
        assert not np.array_equal(averages[name], logical(graph, sess, name))
    reader = tf.train.load_checkpoint(os.path.join(ckpt, "model.ckpt"))
    for name, value in averages.items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)
    sess.close()


def test_selection_sees_the_logical_name_and_keeps_tables_whole():
    graph, sess = build()
    sess.close()
    parts = {f"emb/part_{i}" for i in range(4)}
    chosen, _ = select_variables(graph, SelectionSpec(include=["^emb"]))
    assert {v.op.name for v in chosen} >= parts
    for spec in (SelectionSpec(include=["emb$"]), SelectionSpec(exclude=["part_1", "^w$"])):
        names = {v.op.name for v in select_variables(graph, spec)[0]}
        assert names >= parts and "w" not in names, spec
    with pytest.raises(SelectionError, match="matches no variable.*e.g. emb, emb2, w"):
        select_variables(graph, SelectionSpec(include=["part_0"]))
    # Outputs that read one part (inference policy) keep every part.
    infos = [VariableInfo(f"t/part_{i}", False, partition_of="t") for i in range(3)]
    result = select(infos + [VariableInfo("x", True)], SelectionSpec("inference"),
                    {"t/part_1"})
    assert set(result.names) == {"t/part_0", "t/part_1", "t/part_2", "x"}


def test_writer_refuses_a_table_in_part(storage):
    graph, sess = build()
    sess.close()
    by_name = {v.op.name: v for v in graph.get_collection("variables")}
    some = [by_name[n] for n in ("emb/part_0", "emb/part_1", "emb/part_3", "w")]
    with pytest.raises(SelectionError, match=r"'emb' \[10, 4\] is saved only in part: "
                                             r"indices \[6, 8\) of dimension 0"):
        CheckpointWriter(some)


def rewrite_manifest(ckpt, edit, version=None):
    """Rewrites manifest.parquet through ``edit(rows) -> rows`` (dicts)."""
    path = os.path.join(ckpt, "manifest.parquet")
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    rows = edit(table.to_pylist())
    schema = table.schema
    if version == b"2":
        meta[b"schema_version"] = b"2"
        schema = schema.remove(schema.get_field_index("slice"))
        rows = [{k: v for k, v in r.items() if k != "slice"} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.with_metadata(meta)), path)


def test_a_slice_missing_from_the_manifest_is_named(written):
    ckpt = written[0]
    rewrite_manifest(ckpt, lambda rows: [r for r in rows if r["slice"] != "3,3:0,4"])
    for call in (lambda: read_manifest(ckpt), lambda: verify_checkpoint(ckpt)):
        with pytest.raises(SliceLayoutError, match=r"partitioned variable 'emb' \[10, 4\] "
                           r"do not cover it: indices \[3, 6\) of dimension 0 are in no "
                           "slice.*restore an earlier checkpoint"):
            call()
    report = verify_checkpoint(ckpt, raise_on_error=False)
    assert not report.ok and "indices [3, 6)" in str(report.problems[0])


@pytest.mark.parametrize("bad, fragment", [
    ("0,11:0,4", r"indices \[0, 11\) of dimension 0 lie outside the tensor's 10"),
    ("0,3", "has 1 dimension"),
    ("0,3:x", "dimension 1 is 'x'"),
    ("3,3:0,4", "appears twice"),
    ("0,4:0,4", r"overlaps the one before it \(indices \[3, 4\)"),
    (None, "both an unsliced row and slices"),
])
def test_hostile_slices_are_refused(written, bad, fragment):
    ckpt = written[0]

    def edit(rows):
        first = next(r for r in rows if r["slice"] == "0,3:0,4")
        first["slice"] = bad
        if bad == "0,4:0,4":
            first["length"] = 64
        if bad is None:
            first["length"] = 160
        return rows
    rewrite_manifest(ckpt, edit)
    with pytest.raises(ManifestError, match=fragment):
        read_manifest(ckpt)


def test_version_2_manifests_still_read(tiny_model, storage):
    vs, _ = select_variables(tiny_model.graph, SelectionSpec("all"))
    store = CheckpointStore(storage, "run")
    store.open()
    ckpt = store.checkpoint_dir(store.save(CheckpointWriter(vs), tiny_model.sess, 1,
                                           "full", "{}"))
    current = read_manifest(ckpt)
    rewrite_manifest(ckpt, lambda rows: rows, version=b"2")  # as this code wrote them
    report = verify_checkpoint(ckpt)
    assert report.ok and report.num_tensors == len(vs)
    manifest = read_manifest(ckpt)
    assert manifest.metadata["schema_version"] == "2"
    assert manifest.tensors == current.tensors and all(t.slice is None
                                                       for t in manifest.tensors)
    names = [t.name for t in manifest.tensors]
    got = read_verified(ckpt, manifest, names, np.dtype)
    for v, value in zip(vs, tiny_model.sess.run(vs)):
        np.testing.assert_array_equal(got[v.op.name], value)


def test_a_flip_in_a_slice_is_named_and_every_flip_found(written, storage):
    """Down the checksum chain (the catalog row's manifest CRC first): a flip
    anywhere in the checkpoint's files is found."""
    ckpt = written[0]
    store = CheckpointStore(storage, "run")
    row = read_manifest(ckpt).by_name()["emb"][2]
    flip(os.path.join(ckpt, row.shard), row.offset + 3)
    report = verify_checkpoint(ckpt, raise_on_error=False)
    [problem] = report.problems
    assert problem.tensor == "emb" and "slice 6,2:0,4: CRC-32C mismatch" in problem.message
    flip(os.path.join(ckpt, row.shard), row.offset + 3)
    rng = random.Random(3)
    files = sorted(os.listdir(ckpt))
    for _ in range(60):
        name = rng.choice(files)
        path = os.path.join(ckpt, name)
        offset = rng.randrange(os.path.getsize(path))
        flip(path, offset)
        assert not store.verify(1, raise_on_error=False).ok, (name, offset)
        flip(path, offset)
    assert store.verify(1).ok


def test_slice_keys_decode_as_tensorflow_encodes_them(tmp_path):
    """SaveV2 with starts from 0 to 2**62 (every OrderedCode length); read_index
    checks each decoded key against the full entry's own slice list."""
    starts = [0, 63, 64, 8191, 8192, 2**31 + 7, 2**40 + 1, 2**55 - 1, 2**55, 2**62]
    rows = 2**62 + 10
    prefix = str(tmp_path / "m")
    tf.raw_ops.SaveV2(
        prefix=prefix, tensor_names=[f"t{i}" for i in range(len(starts))],
        shape_and_slices=[f"{rows} 1 {s},1:-" for s in starts],
        tensors=[tf.fill([1, 1], float(i)) for i in range(len(starts))])
    entries = read_index(prefix + ".index")
    assert [(e.name, e.shape, e.slice) for e in entries] == [
        (f"t{i}", (rows, 1), ((s, 1), (0, -1))) for i, s in enumerate(starts)]
    key = b"\x00emb\x00\x01\x01\x02\x83\x83\x80\x84"  # emb, slice 3,3:0,4
    assert decode_slice_key(key) == ("emb", ((3, 3), (0, 4)))
    for bad in (key[:-1], key + b"\x00", b"\x01" + key[1:], key.replace(b"\x00\x01", b"")):
        with pytest.raises(ValueError):
            decode_slice_key(bad)


def test_uncovered_names_gaps_and_overlaps():
    assert uncovered((10, 4), [((0, 5), (0, 4)), ((5, 5), (0, 4))]) is None
    assert uncovered((10, 4), [((0, 5), (0, 4))]) == \
        "indices [5, 10) of dimension 0 are in no slice"
    assert uncovered((4, 10), [((0, 4), (0, 3)), ((0, 4), (5, 5))]) == \
        "indices [3, 5) of dimension 1 are in no slice"
    assert uncovered((4, 4), [((0, 2), (0, 2)), ((2, 2), (0, 4)), ((0, 2), (2, 2))]) is None
    assert uncovered((4, 4), [((0, 2), (0, 2)), ((2, 2), (0, 4))]) == \
        "4 of the tensor's 16 elements are in no slice"
    assert "overlap" in uncovered((4, 4), [((0, 3), (0, 3)), ((2, 2), (0, 4)),
                                           ((0, 2), (2, 2))])


def test_parts_that_differ_between_graphs_are_one_clear_error():
    """What a worker's VariableLoader does with the coordinator's values when
    the two graphs partition ``emb`` differently."""
    sender, sess = build(4, 3)
    values = sess.run({v.op.name: v for v in sender.get_collection("variables")})
    sess.close()
    for parts, parts2, fragment in (
            (3, 3, (r"variable 'emb' is partitioned differently.*\(emb/part_0 \[3, 4\], "
                    r".*\) and in this one \(emb/part_0 \[4, 4\], emb/part_1 \[3, 4\], "
                    r"emb/part_2 \[3, 4\]\).*fixed_size_partitioner\(n\)")),
            (4, 0, r"variable 'emb2' is partitioned differently.*this one \(emb2 \[5, 7\]\)")):
        receiver, sess = build(parts, parts2)
        with receiver.as_default():
            loader = VariableLoader(list(receiver.get_collection("variables")))
        with pytest.raises(PartitionMismatchError, match=fragment):
            loader.load(sess, values)
        sess.close()
    receiver, sess = build(4, 3)
    with receiver.as_default():
        loader = VariableLoader(list(receiver.get_collection("variables")))
    loader.load(sess, values)  # the same layout loads
    np.testing.assert_array_equal(logical(receiver, sess, "emb"),
                                  np.concatenate([values[f"emb/part_{i}"] for i in range(4)]))
    with pytest.raises(KeyError, match="no variable named"):
        loader.load(sess, {"unrelated": np.zeros(3, np.float32)})
    sess.close()


def test_a_large_unpartitioned_table_warns_and_a_partitioned_one_does_not():
    """Rule: one unsliced variable over twice a balanced shard (and >= 64 MiB)
    warns, naming it, its size and the partitioner fix. No values are made:
    building the writer needs only the graph."""
    for parts in (0, 4):
        graph = tf.Graph()
        with graph.as_default():
            table = tf.compat.v1.get_variable(
                "big", [4_000_000, 64], partitioner=tf.compat.v1.fixed_size_partitioner(
                    parts) if parts else None)
            small = [tf.compat.v1.get_variable(f"s{i}", [1024, 1024]) for i in range(4)]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                CheckpointWriter((list(table) if parts else [table]) + small, num_shards=4)
        found = [str(w.message) for w in caught if w.category is ShardImbalanceWarning]
        if parts:
            assert found == []
        else:
            assert found == [(
                "variable 'big' (977 MiB) is not partitioned and is over twice a balanced "
                "shard (248 MiB of 4): its shard alone sets the save time. Partition it: "
                "tf.compat.v1.get_variable(..., partitioner=tf.compat.v1."
                "fixed_size_partitioner(4)) so each shard gets a part")]
    assert sharding.oversized({"a": 100 << 20, "b": 1 << 20}, 1, {"a"}) == []
    assert sharding.oversized({"a": 100 << 20, "b": 100 << 20}, 2, {"a", "b"}) == []
    assert sharding.oversized({"a": 10 << 20, "b": 1}, 8, {"a"}) == []  # below the floor


def test_an_oversized_unpartitioned_table_is_a_warning_the_run_prints(storage):
    """The writer's ShardImbalanceWarning reaches the coordinator's plan, whose
    warnings the trainer prints at the start of the run."""
    from distributed import config as config_lib
    from distributed.train.coordinator import Coordinator
    cfg = config_lib.from_dict({"model": "tests.helpers.partitioned_models:"
                                         "big_table_model_fn",
                                "storage": storage, "run": "big", "workers": 1,
                                "optimizer": {"name": "sgd", "learning_rate": 0.1},
                                "checkpoint": {"shards": 4}})
    plan = Coordinator(cfg.to_dict()).build()
    # (The full tier's 3 variables make 3 shards: "big" is over twice 1/3.)
    (warning,) = [w for w in plan.warnings if "is not partitioned" in w]
    assert "variable 'big' (68 MiB)" in warning and "fixed_size_partitioner(3)" in warning
