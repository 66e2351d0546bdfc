"""The catalog: one Arrow row per committed checkpoint, stored as Parquet.

Each committed checkpoint has a row file ``catalog/step-<N>.<tier>.parquet``.
Writing that file (atomically, last) *is* the commit; deleting it (first) is the
start of a deletion. So "a checkpoint exists iff its row file exists" holds for
every reader, and :meth:`Catalog.committed_keys` is the one place that decides it.

All row files share :data:`CATALOG_SCHEMA`, so the directory reads as one table
with no code of ours::

    duckdb -c "SELECT step, tier, metrics FROM 'runs/demo/catalog/*.parquet'"

Listing 10,000 small files would be slow, so the writer keeps a compacted copy
of the rows in ``catalog/_compacted/catalog.parquet``. It is only an accelerator:
readers take from it just the rows whose row files still exist and read the
few row files it does not have yet, so a stale or missing cache can never hide a
committed checkpoint or show a deleted one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import os
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed.checkpoint import layout
from distributed.checkpoint.manifest import check_schema_version
from distributed.errors import CheckpointNotFoundError, ManifestError

SCHEMA_VERSION = "1"
COMPACTED_DIR = "_compacted"
COMPACTED_FILE = "catalog.parquet"
# Rewrite the compacted copy once this many row files are missing from it.
COMPACT_EVERY = 64

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
        num_tensors: Tensors in the checkpoint.
        num_bytes: Tensor bytes (sum of manifest lengths).
        num_shards: ``.data`` files.
        save_seconds: Time from start of write to commit.
        committed_at: UTC time of the commit.
        metrics: Training metrics at that step (e.g. ``loss``).
        selection: The selection spec as JSON.
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

    @property
    def key(self) -> tuple[int, str]:
        return self.step, self.tier

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["committed_at"] = self.committed_at.isoformat()
        d["metrics"] = dict(self.metrics)
        return d


def _to_table(entries: list[CatalogEntry]) -> pa.Table:
    cols = {f.name: [getattr(e, f.name) for e in entries] for f in CATALOG_SCHEMA}
    cols["metrics"] = [list(dict(m).items()) for m in cols["metrics"]]
    return pa.Table.from_pydict(cols, schema=CATALOG_SCHEMA)


def _from_row(row: dict[str, Any]) -> CatalogEntry:
    row = dict(row)
    row["metrics"] = dict(row["metrics"] or [])
    return CatalogEntry(**row)


def _check_schema(schema: pa.Schema, path: str) -> None:
    for want in CATALOG_SCHEMA:
        idx = schema.get_field_index(want.name)
        got = schema.field(want.name) if idx >= 0 else None
        if got is None or not got.type.equals(want.type):
            raise ManifestError(
                f"{path}: catalog column {want.name!r} is "
                f"{'missing' if got is None else got.type}, expected {want.type}")
    if len(schema) != len(CATALOG_SCHEMA):
        raise ManifestError(f"{path}: catalog row has unexpected extra columns")


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue()


class Catalog:
    """Reads and writes one run's catalog directory.

    NOTE: only the run's coordinator calls :meth:`commit`, :meth:`remove` and
    :meth:`compact`; any number of readers may list concurrently.
    """

    def __init__(self, run_layout: layout.RunLayout):
        self._layout = run_layout
        self._dir = run_layout.catalog_dir
        self._uncompacted_commits = 0

    @property
    def directory(self) -> str:
        return self._dir

    @property
    def run(self) -> str:
        return self._layout.run

    # -- the commit record -------------------------------------------------

    def committed_keys(self) -> dict[tuple[int, str], str]:
        """``{(step, tier): row file name}`` of every committed checkpoint.

        This is the single definition of "committed" that every reader uses.
        """
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return {}
        keys = {}
        for name in names:
            parsed = layout.parse_catalog_row_name(name)
            if parsed is not None:
                keys[parsed] = name
        return keys

    def commit(self, entry: CatalogEntry) -> None:
        """Writes the row file; after this returns the checkpoint exists."""
        expected = self._layout.relative_checkpoint_path(entry.tier, entry.step)
        if entry.path != expected or entry.run != self._layout.run:
            raise ValueError(f"catalog entry {entry} does not belong at {expected}")
        os.makedirs(self._dir, exist_ok=True)
        table = _to_table([entry])
        layout.atomic_write_bytes(
            os.path.join(self._dir, layout.catalog_row_name(entry.step, entry.tier)),
            _table_bytes(table))
        self._uncompacted_commits += 1
        if self._uncompacted_commits >= COMPACT_EVERY:
            self.compact()

    def remove(self, step: int, tier: str) -> None:
        """Deletes a row file: from now on the checkpoint does not exist.

        NOTE: retention calls this *before* deleting the checkpoint directory,
        so a crash in between leaves an orphan directory, never a row that
        points at missing data.
        """
        path = os.path.join(self._dir, layout.catalog_row_name(step, tier))
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        layout.fsync_dir(self._dir)

    # -- reading -----------------------------------------------------------

    def _read_row_file(self, name: str) -> pa.Table:
        path = os.path.join(self._dir, name)
        try:
            table = pq.read_table(path, page_checksum_verification=True)
        except FileNotFoundError:
            raise  # not committed (any more): callers handle it
        except (pa.ArrowException, OSError) as e:
            raise ManifestError(f"{path}: catalog row is unreadable ({e})") from e
        check_schema_version(table.schema.metadata, path, SCHEMA_VERSION)
        _check_schema(table.schema, path)
        step, tier = layout.parse_catalog_row_name(name)
        rows = table.to_pylist()
        want = self._layout.relative_checkpoint_path(tier, step)
        if (len(rows) != 1 or rows[0]["step"] != step or rows[0]["tier"] != tier
                or rows[0]["path"] != want):
            raise ManifestError(
                f"{path}: catalog row does not describe {tier} step {step} at "
                f"{want}; the file is damaged or was tampered with")
        return table

    def _read_compacted(self) -> pa.Table | None:
        path = os.path.join(self._dir, COMPACTED_DIR, COMPACTED_FILE)
        try:
            table = pq.read_table(path, page_checksum_verification=True)
            check_schema_version(table.schema.metadata, path, SCHEMA_VERSION)
            _check_schema(table.schema, path)
        except (FileNotFoundError, pa.ArrowException, OSError, ManifestError):
            return None  # only an accelerator: fall back to the row files
        return table.cast(CATALOG_SCHEMA)

    def table(self, tier: str | None = None) -> pa.Table:
        """Every committed checkpoint as one Arrow table, sorted by tier, step."""
        keys = self.committed_keys()
        if tier is not None:
            layout.check_tier(tier)
            keys = {k: v for k, v in keys.items() if k[1] == tier}
        parts = []
        have: set[tuple[int, str]] = set()
        cached = self._read_compacted() if keys else None
        if cached is not None and cached.num_rows:
            key_col = pc.binary_join_element_wise(
                pc.cast(cached["step"], pa.string()), cached["tier"], ".")
            wanted = pa.array([f"{s}.{t}" for s, t in keys], pa.string())
            cached = cached.filter(pc.is_in(key_col, value_set=wanted))
            cached = cached.replace_schema_metadata(CATALOG_SCHEMA.metadata)
            have = set(zip(cached["step"].to_pylist(), cached["tier"].to_pylist()))
            parts.append(cached)
        for key in sorted(set(keys) - have):
            try:
                parts.append(self._read_row_file(keys[key]))
            except FileNotFoundError:
                continue  # removed by retention while we listed
        if not parts:
            return CATALOG_SCHEMA.empty_table()
        table = pa.concat_tables(parts)
        return table.sort_by([("tier", "ascending"), ("step", "ascending")])

    def entries(self, tier: str | None = None) -> list[CatalogEntry]:
        """Every committed checkpoint, sorted by tier then step."""
        return [_from_row(r) for r in self.table(tier).to_pylist()]

    def get(self, step: int, tier: str = "serving") -> CatalogEntry:
        """The committed checkpoint at ``step``.

        Raises:
            CheckpointNotFoundError: No such committed checkpoint.
        """
        layout.check_tier(tier)
        name = layout.catalog_row_name(step, tier)
        try:
            return _from_row(self._read_row_file(name).to_pylist()[0])
        except FileNotFoundError:
            steps = sorted(s for s, t in self.committed_keys() if t == tier)
            near = ", ".join(map(str, steps[-5:])) or "none"
            raise CheckpointNotFoundError(
                f"run {self._layout.run!r} has no committed {tier} checkpoint at "
                f"step {step} (latest {tier} steps: {near})") from None

    def latest(self, tier: str = "serving") -> CatalogEntry | None:
        """The committed checkpoint with the highest step, or ``None``."""
        layout.check_tier(tier)
        for step in sorted((s for s, t in self.committed_keys() if t == tier),
                           reverse=True):
            try:
                return self.get(step, tier)
            except CheckpointNotFoundError:
                continue  # deleted between listing and reading
        return None

    def best(self, metric: str, mode: str = "min",
             tier: str = "serving") -> CatalogEntry:
        """The committed checkpoint with the lowest (``min``) or highest metric.

        Raises:
            ValueError: ``mode`` is not ``min`` or ``max``.
            CheckpointNotFoundError: No checkpoint of ``tier`` records ``metric``.
        """
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode!r} is not valid: use 'min' or 'max'")
        scored = [e for e in self.entries(tier) if metric in e.metrics]
        if not scored:
            raise CheckpointNotFoundError(
                f"run {self._layout.run!r} has no committed {tier} checkpoint that "
                f"records metric {metric!r}")
        if mode == "min":  # ties go to the newest step
            return min(scored, key=lambda e: (e.metrics[metric], -e.step))
        return max(scored, key=lambda e: (e.metrics[metric], e.step))

    # -- maintenance -------------------------------------------------------

    def compact_if_stale(self) -> bool:
        """Compacts when :data:`COMPACT_EVERY` or more rows are missing from the
        compacted copy (e.g. after many short-lived writers). Returns whether it did."""
        keys = self.committed_keys()
        cached = self._read_compacted()
        have = set() if cached is None else set(
            zip(cached["step"].to_pylist(), cached["tier"].to_pylist()))
        if len(set(keys) - have) >= COMPACT_EVERY:
            self.compact()
            return True
        return False

    def compact(self) -> None:
        """Rewrites the compacted copy from the current rows (atomic replace)."""
        table = self.table()
        directory = os.path.join(self._dir, COMPACTED_DIR)
        os.makedirs(directory, exist_ok=True)
        layout.atomic_write_bytes(os.path.join(directory, COMPACTED_FILE),
                                  _table_bytes(table))
        self._uncompacted_commits = 0

    def remove_stale_tmp_files(self) -> list[str]:
        """Deletes ``*.tmp-*`` files left by a crashed writer; returns their paths."""
        removed = []
        for directory in (self._dir, os.path.join(self._dir, COMPACTED_DIR)):
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                if layout.is_tmp_name(name):
                    path = os.path.join(directory, name)
                    os.unlink(path)
                    removed.append(path)
        return removed


def utc_now(clock: Callable[[], float] | None = None) -> _dt.datetime:
    """Current UTC time from ``clock`` (seconds since the epoch) or the system."""
    import time
    seconds = (clock or time.time)()
    return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)

