"""The catalog's record format: the row schema, :class:`CatalogEntry`, and
Parquet files read and written down the checksum chain.

Kept apart from :class:`~distributed.checkpoint.catalog.Catalog` (which decides
what is committed) so the format, what a row *is*, reads in one place: a row
file and the compacted copy are both Parquet files whose name records the
CRC-32C of their bytes, checked here before a byte is parsed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import time
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from distributed.checkpoint import layout
from distributed.errors import CheckpointCorruptError, ManifestError

# 2: adds ``manifest_crc32c``; row file names carry the CRC-32C of their bytes.
SCHEMA_VERSION = "2"

CATALOG_SCHEMA = pa.schema([
    pa.field("run", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("tier", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("num_tensors", pa.int64(), nullable=False),
    pa.field("num_bytes", pa.int64(), nullable=False),
    pa.field("num_shards", pa.int64(), nullable=False),
    pa.field("save_seconds", pa.float64(), nullable=False),
    pa.field("committed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("metrics", pa.map_(pa.string(), pa.float64())),
    pa.field("selection", pa.string(), nullable=False),
    pa.field("manifest_crc32c", pa.uint32(), nullable=False),
], metadata={"schema_version": SCHEMA_VERSION,
             "format": "distributed-tf-ray/catalog"})


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One committed checkpoint.

    Attributes:
        run: Run name.
        step: Global training step of the checkpoint.
        tier: ``serving`` or ``full``.
        path: Checkpoint directory relative to the run root.
        num_tensors: Tensors in the checkpoint (a partitioned variable counts once).
        num_bytes: Tensor bytes (sum of manifest lengths).
        num_shards: ``.data`` files.
        save_seconds: Time from start of write to commit.
        committed_at: UTC time of the commit.
        metrics: Training metrics at that step (e.g. ``loss``).
        selection: The selection spec as JSON.
        manifest_crc32c: CRC-32C of the checkpoint's ``manifest.parquet`` bytes.
    """

    run: str
    step: int
    tier: str
    path: str
    num_tensors: int
    num_bytes: int
    num_shards: int
    save_seconds: float
    committed_at: _dt.datetime
    metrics: Mapping[str, float]
    selection: str
    manifest_crc32c: int

    @property
    def key(self) -> tuple[int, str]:
        return self.step, self.tier

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["committed_at"] = self.committed_at.isoformat()
        d["metrics"] = dict(self.metrics)
        return d


def to_table(entries: list[CatalogEntry]) -> pa.Table:
    """Entries as :data:`CATALOG_SCHEMA` rows."""
    cols = {f.name: [getattr(e, f.name) for e in entries] for f in CATALOG_SCHEMA}
    cols["metrics"] = [list(dict(m).items()) for m in cols["metrics"]]
    return pa.Table.from_pydict(cols, schema=CATALOG_SCHEMA)


def from_row(row: dict[str, Any]) -> CatalogEntry:
    """The entry of one :data:`CATALOG_SCHEMA` row (extra columns ignored)."""
    row = {f.name: row[f.name] for f in CATALOG_SCHEMA}
    row["metrics"] = dict(row["metrics"] or [])
    return CatalogEntry(**row)


def check_schema(schema: pa.Schema, path: str,
                 want_schema: pa.Schema = CATALOG_SCHEMA) -> None:
    """Raises :class:`ManifestError` unless ``schema`` has exactly
    ``want_schema``'s columns and types."""
    for want in want_schema:
        idx = schema.get_field_index(want.name)
        got = schema.field(want.name) if idx >= 0 else None
        if got is None or not got.type.equals(want.type):
            raise ManifestError(
                f"{path}: catalog column {want.name!r} is "
                f"{'missing' if got is None else got.type}, expected {want.type}")
    if len(schema) != len(want_schema):
        raise ManifestError(f"{path}: catalog row has unexpected extra columns")


def read_checked(path: str, crc: int, what: str, fix: str = "") -> pa.Table:
    """Reads a Parquet file whose name records ``crc``; checks the CRC first
    (``fix`` is appended to the message when it fails).

    Raises:
        FileNotFoundError: The file is gone (e.g. removed by retention).
        CheckpointCorruptError: Its bytes do not match ``crc``.
        ManifestError: It cannot be read or parsed.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ManifestError(f"{path}: {what} is unreadable ({e})") from e
    actual = layout.bytes_crc32c(data)
    if actual != crc:
        raise CheckpointCorruptError(
            f"{path}: {what} is corrupt: the CRC-32C of its bytes is {actual:#010x} "
            f"but its name records {crc:#010x}{fix}", path=path)
    try:
        return pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{path}: {what} is unreadable ({e})") from e


def table_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes of ``table``, with page checksums, as every catalog
    file is written."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue()


def utc_now(clock: Callable[[], float] | None = None) -> _dt.datetime:
    """Current UTC time from ``clock`` (seconds since the epoch) or the system."""
    seconds = (clock or time.time)()
    return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)
