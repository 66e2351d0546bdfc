"""The catalog: commit records, queries, compaction, versions, other readers."""

import datetime as dt
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed.checkpoint import CATALOG_SCHEMA, Catalog, CatalogEntry, RunLayout
from distributed.checkpoint import catalog as catalog_mod
from distributed.errors import CheckpointNotFoundError, ManifestError, SchemaVersionError


def entry(step, tier="serving", loss=None, run="run"):
    return CatalogEntry(
        run=run, step=step, tier=tier,
        path=f"checkpoints/{tier}/step-{step:09d}", num_tensors=3, num_bytes=100,
        num_shards=1, save_seconds=0.1,
        committed_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        metrics={} if loss is None else {"loss": loss}, selection="{}")


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
    compacted = os.path.join(catalog.directory, "_compacted", "catalog.parquet")
    assert pq.read_table(compacted).num_rows == 10  # written at 5 and 10 commits
    catalog.remove(3, "serving")  # row in the compacted copy, deleted since
    steps = [e.step for e in catalog.entries()]
    assert steps == [s for s in range(1, 13) if s != 3]
    with open(compacted, "wb") as f:  # a damaged cache is ignored, not trusted
        f.write(b"garbage")
    assert [e.step for e in catalog.entries()] == steps


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
    path = os.path.join(catalog.directory, "step-000000001.serving.parquet")
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"schema_version"] = b"99"
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(SchemaVersionError, match="schema_version '99' is not supported"):
        catalog.entries()


def test_row_that_lies_about_its_path_is_rejected(catalog):
    catalog.commit(entry(1))
    path = os.path.join(catalog.directory, "step-000000001.serving.parquet")
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("path"),
                             table.schema.field("path"),
                             pa.array(["../../etc"], pa.string()))
    pq.write_table(table, path)
    with pytest.raises(ManifestError, match="does not describe serving step 1"):
        catalog.get(1)


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
    compacted = os.path.join(storage, "run", "catalog", "_compacted", "catalog.parquet")
    assert not os.path.exists(compacted)
    Catalog(RunLayout(storage, "run")).commit(entry(4))
    CheckpointStore(storage, "run").open()
    assert pq.read_table(compacted).num_rows == 4
