"""Verify finds and names bad bytes; hostile manifests are rejected."""

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed.checkpoint import (CheckpointStore, CheckpointWriter, SelectionSpec,
                                    read_manifest, select_variables, verify_checkpoint)
from distributed.errors import CheckpointCorruptError, ManifestError, SchemaVersionError
from tests.helpers.damage import flip


@pytest.fixture
def ckpt(tiny_model, storage):
    vs, _ = select_variables(tiny_model.graph, SelectionSpec("all"))
    store = CheckpointStore(storage, "run")
    store.open()
    entry = store.save(CheckpointWriter(vs, num_shards=2), tiny_model.sess, 1, "full", "{}")
    return store.checkpoint_dir(entry)


def test_good_checkpoint_verifies(ckpt):
    report = verify_checkpoint(ckpt)
    assert report.ok and report.num_tensors > 10 and report.num_bytes > 0


def test_flipped_byte_in_a_shard_is_named(ckpt):
    manifest = read_manifest(ckpt)
    rng = random.Random(0)
    target = rng.choice([t for t in manifest.tensors if t.length > 0])
    shard = os.path.join(ckpt, target.shard)
    flip(shard, target.offset + rng.randrange(target.length))
    with pytest.raises(CheckpointCorruptError) as info:
        verify_checkpoint(ckpt)
    err = info.value
    assert err.tensor == target.name and err.path == shard
    assert target.name in str(err) and target.shard in str(err) and "CRC-32C" in str(err)
    report = verify_checkpoint(ckpt, raise_on_error=False)
    assert [p.tensor for p in report.problems] == [target.name]


def test_every_flip_in_shards_and_index_is_detected(ckpt):
    rng = random.Random(1)
    files = [f for f in os.listdir(ckpt) if f.startswith("model.ckpt")]
    for trial in range(20):
        name = rng.choice(files)
        path = os.path.join(ckpt, name)
        offset = rng.randrange(os.path.getsize(path))
        flip(path, offset)
        report = verify_checkpoint(ckpt, raise_on_error=False)
        assert not report.ok, f"flip at {name}:{offset} went unnoticed"
        assert any(p.path.endswith(name) for p in report.problems)
        flip(path, offset)  # restore
    assert verify_checkpoint(ckpt).ok


def test_truncated_shard_is_named(ckpt):
    shard = os.path.join(ckpt, "model.ckpt.data-00000-of-00002")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(CheckpointCorruptError, match="past the end of the file"):
        verify_checkpoint(ckpt)


def test_missing_shard_is_named(ckpt):
    os.unlink(os.path.join(ckpt, "model.ckpt.data-00001-of-00002"))
    with pytest.raises(CheckpointCorruptError, match="data-00001-of-00002.*cannot read shard"):
        verify_checkpoint(ckpt)


def rewrite_manifest(ckpt, column, transform, meta=None):
    path = os.path.join(ckpt, "manifest.parquet")
    table = pq.read_table(path)
    if column is not None:
        idx = table.schema.get_field_index(column)
        values = table[column].to_pylist()
        values[0] = transform(values[0])
        field = table.schema.field(column)
        if values[0] is None:
            field = field.with_nullable(True)
        table = table.set_column(idx, field, pa.array(values, field.type))
    if meta is not None:
        m = dict(table.schema.metadata)
        m.update(meta)
        table = table.replace_schema_metadata(m)
    pq.write_table(table, path)


@pytest.mark.parametrize("column, transform, fragment", [
    ("shard", lambda s: "/etc/passwd", "is not a plain data-shard file name"),
    ("shard", lambda s: "../" + s, "is not a plain data-shard file name"),
    ("shard", lambda s: "sub/" + s, "is not a plain data-shard file name"),
    ("offset", lambda o: -1, "negative offset"),
    ("length", lambda n: n + 4, "bytes but the manifest says"),
    ("shape", lambda s: [99, 99], "bytes but the manifest says"),
    ("name", lambda n: None, "null fields"),
])
def test_hostile_manifest_rows_are_rejected(ckpt, column, transform, fragment):
    rewrite_manifest(ckpt, column, transform)
    with pytest.raises(ManifestError, match=fragment):
        read_manifest(ckpt)


def test_overlapping_tensors_are_rejected(ckpt):
    manifest = read_manifest(ckpt)
    rows = sorted((t for t in manifest.tensors if t.shard.endswith("00000-of-00002")),
                  key=lambda t: t.offset)
    first, second = rows[0], rows[1]
    path = os.path.join(ckpt, "manifest.parquet")
    table = pq.read_table(path)
    names = table["name"].to_pylist()
    offsets = table["offset"].to_pylist()
    offsets[names.index(second.name)] = first.offset
    table = table.set_column(table.schema.get_field_index("offset"),
                             table.schema.field("offset"), pa.array(offsets, pa.int64()))
    pq.write_table(table, path)
    with pytest.raises(ManifestError, match="overlap"):
        read_manifest(ckpt)


def test_symlink_out_of_the_checkpoint_is_rejected(ckpt, tmp_path):
    shard = os.path.join(ckpt, "model.ckpt.data-00001-of-00002")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(open(shard, "rb").read())
    os.unlink(shard)
    os.symlink(outside, shard)
    with pytest.raises(ManifestError, match="outside"):
        read_manifest(ckpt)


@pytest.mark.parametrize("version", [b"1", b"4"])
def test_unknown_manifest_version_is_rejected(ckpt, version):
    rewrite_manifest(ckpt, None, None, meta={b"schema_version": version})
    with pytest.raises(SchemaVersionError,
                       match=f"schema_version '{version.decode()}' is not supported"):
        read_manifest(ckpt)


def test_missing_or_garbage_manifest(ckpt):
    path = os.path.join(ckpt, "manifest.parquet")
    with open(path, "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(ManifestError, match="manifest is unreadable"):
        read_manifest(ckpt)
    os.unlink(path)
    with pytest.raises(ManifestError, match="manifest is missing"):
        read_manifest(ckpt)
