"""The catalog: commit records, queries, compaction, versions, other readers."""

import glob
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed.checkpoint import CATALOG_SCHEMA, Catalog, RunLayout
from distributed.checkpoint import catalog as catalog_mod
from distributed.checkpoint import catalog_format
from distributed.checkpoint import layout
from distributed.errors import (CheckpointCorruptError, CheckpointExistsError,
                                CheckpointNotFoundError, ManifestError, SchemaVersionError)
from tests.helpers.catalog_entries import entry


def row_path(catalog, step, tier="serving"):
    return os.path.join(catalog.directory, catalog.committed_keys()[step, tier])


def rewrite_row(catalog, step, table, tier="serving"):
    """Replaces a row file with ``table`` under the name its new bytes' CRC gives,
    so what is tested is the checks after the CRC."""
    os.unlink(row_path(catalog, step, tier))
    data = catalog_format.table_bytes(table)
    name = layout.catalog_row_name(step, tier, layout.bytes_crc32c(data))
    with open(os.path.join(catalog.directory, name), "wb") as f:
        f.write(data)


def compacted_files(catalog):
    return glob.glob(os.path.join(catalog.directory, "_compacted", "catalog.*.parquet"))


def flip_byte(path, offset, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


@pytest.fixture
def catalog(storage):
    return Catalog(RunLayout(storage, "run"))


def test_empty_catalog(catalog):
    assert catalog.entries() == []
    assert catalog.latest() is None
    assert catalog.table().schema.equals(CATALOG_SCHEMA)
    with pytest.raises(CheckpointNotFoundError, match="no committed serving checkpoint at step 5"):
        catalog.get(5)
    with pytest.raises(CheckpointNotFoundError, match="records metric 'loss'"):
        catalog.best("loss")


def test_queries(catalog):
    for step, loss in [(100, 0.9), (200, 0.3), (300, 0.5), (400, 0.3)]:
        catalog.commit(entry(step, loss=loss))
    catalog.commit(entry(250, tier="full"))
    assert [e.step for e in catalog.entries("serving")] == [100, 200, 300, 400]
    assert [e.key for e in catalog.entries()] == [
        (250, "full"), (100, "serving"), (200, "serving"), (300, "serving"), (400, "serving")]
    assert catalog.latest().step == 400
    assert catalog.latest("full").step == 250
    assert catalog.get(300).metrics == {"loss": 0.5}
    assert catalog.best("loss", "min").step == 400  # tie: newest wins
    assert catalog.best("loss", "max").step == 100
    with pytest.raises(ValueError, match="use 'min' or 'max'"):
        catalog.best("loss", "lowest")
    with pytest.raises(CheckpointNotFoundError, match="latest serving steps: 100, 200, 300, 400"):
        catalog.get(150)


def test_remove_makes_checkpoint_not_exist(catalog):
    catalog.commit(entry(1))
    catalog.commit(entry(2))
    catalog.remove(2, "serving")
    assert catalog.latest().step == 1
    catalog.remove(2, "serving")  # idempotent


def test_compaction_is_only_an_accelerator(catalog, monkeypatch):
    monkeypatch.setattr(catalog_mod, "COMPACT_EVERY", 5)
    for step in range(1, 13):
        catalog.commit(entry(step, loss=float(step)))
    [compacted] = compacted_files(catalog)  # older copies are deleted
    assert pq.read_table(compacted).num_rows == 10  # written at 5 and 10 commits
    catalog.remove(3, "serving")  # row in the compacted copy, deleted since
    steps = [e.step for e in catalog.entries()]
    assert steps == [s for s in range(1, 13) if s != 3]
    flip_byte(compacted, os.path.getsize(compacted) // 2)  # fails its CRC: ignored
    assert [e.step for e in catalog.entries()] == steps
    with open(compacted, "wb") as f:  # a damaged cache is ignored, not trusted
        f.write(b"garbage")
    assert [e.step for e in catalog.entries()] == steps


def test_compacted_row_is_used_only_for_the_row_file_it_came_from(catalog):
    catalog.commit(entry(1, loss=1.0))
    catalog.compact()
    catalog.remove(1, "serving")
    catalog.commit(entry(1, loss=2.0))  # same key, new row file: the cache is stale
    assert catalog.entries()[0].metrics == {"loss": 2.0}
    assert catalog.table().schema.equals(CATALOG_SCHEMA)


def test_duckdb_and_polars_read_the_catalog_with_no_code_of_ours(catalog):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    for step in (10, 20):
        catalog.commit(entry(step, loss=step / 100))
    glob = os.path.join(catalog.directory, "*.parquet")
    rows = duckdb.sql(f"SELECT step, metrics['loss'] AS loss FROM '{glob}' ORDER BY step").fetchall()
    assert [(s, pytest.approx(l)) for s, l in rows] == [(10, 0.1), (20, 0.2)]
    assert pl.read_parquet(glob)["step"].sort().to_list() == [10, 20]


def test_unknown_schema_version_is_rejected(catalog):
    catalog.commit(entry(1))
    table = pq.read_table(row_path(catalog, 1))
    meta = dict(table.schema.metadata)
    meta[b"schema_version"] = b"99"
    rewrite_row(catalog, 1, table.replace_schema_metadata(meta))
    with pytest.raises(SchemaVersionError, match="schema_version '99' is not supported"):
        catalog.entries()


def test_version_1_row_counts_as_committed_but_is_refused(storage):
    from distributed.checkpoint import CheckpointStore
    store = CheckpointStore(storage, "run")
    store.open()
    os.makedirs(store.layout.checkpoint_dir("serving", 5))
    open(os.path.join(store.catalog.directory, "step-000000005.serving.parquet"),
         "wb").close()
    assert (5, "serving") in store.catalog.committed_keys()
    store.open()  # an upgrade must not mistake the old checkpoint for an orphan
    assert os.path.isdir(store.layout.checkpoint_dir("serving", 5))
    with pytest.raises(SchemaVersionError, match="version-1 format"):
        store.catalog.entries()


def test_corrupt_row_is_skipped_when_listing_and_named_by_get(catalog):
    for step, loss in [(1, 0.5), (2, 0.1), (3, 0.9)]:
        catalog.commit(entry(step, loss=loss))
    bad = row_path(catalog, 2)
    flip_byte(bad, 10, 0x80)
    with pytest.warns(catalog_mod.CorruptCatalogRowWarning, match=os.path.basename(bad)):
        assert [e.step for e in catalog.entries()] == [1, 3]
    with pytest.warns(catalog_mod.CorruptCatalogRowWarning):
        assert catalog.best("loss").step == 1
    with pytest.raises(CheckpointCorruptError) as info:
        catalog.get(2)
    assert info.value.path == bad and bad in str(info.value)
    assert "delete it" in str(info.value) and "CRC-32C" in str(info.value)
    flip_byte(bad, 10, 0x80)  # repaired
    flip_byte(row_path(catalog, 3), 0)  # the newest: latest falls back
    with pytest.warns(catalog_mod.CorruptCatalogRowWarning, match="step 3"):
        assert catalog.latest().step == 2


def test_commit_of_a_committed_key_is_refused(catalog):
    catalog.commit(entry(1))
    with pytest.raises(CheckpointExistsError, match="already has a committed serving"):
        catalog.commit(entry(1, loss=3.0))
    assert len(os.listdir(catalog.directory)) == 1


def test_row_that_lies_about_its_path_is_rejected(catalog):
    catalog.commit(entry(1))
    table = pq.read_table(row_path(catalog, 1))
    table = table.set_column(table.schema.get_field_index("path"),
                             table.schema.field("path"),
                             pa.array(["../../etc"], pa.string()))
    rewrite_row(catalog, 1, table)
    with pytest.raises(ManifestError, match="does not describe serving step 1"):
        catalog.get(1)
    with pytest.warns(catalog_mod.CorruptCatalogRowWarning, match="tampered"):
        assert catalog.entries() == []


def test_commit_refuses_entry_of_another_run(catalog):
    with pytest.raises(ValueError, match="does not belong"):
        catalog.commit(entry(1, run="other"))


def test_unrelated_files_are_ignored(catalog):
    catalog.commit(entry(1))
    open(os.path.join(catalog.directory, "notes.txt"), "w").close()
    open(os.path.join(catalog.directory, "step-1.serving.parquet"), "w").close()
    assert [e.step for e in catalog.entries()] == [1]


def test_open_compacts_rows_left_by_short_lived_writers(storage, monkeypatch):
    from distributed.checkpoint import CheckpointStore
    monkeypatch.setattr(catalog_mod, "COMPACT_EVERY", 4)
    for step in range(1, 4):  # three writers, one commit each: no compaction
        Catalog(RunLayout(storage, "run")).commit(entry(step))
    catalog = Catalog(RunLayout(storage, "run"))
    assert not compacted_files(catalog)
    Catalog(RunLayout(storage, "run")).commit(entry(4))
    CheckpointStore(storage, "run").open()
    [compacted] = compacted_files(catalog)
    assert pq.read_table(compacted).num_rows == 4
