"""The catalog: one Arrow row per committed checkpoint, stored as Parquet.

Each committed checkpoint has a row file ``catalog/step-<N>.<tier>.<crc>.parquet``
where ``<crc>`` is the CRC-32C of the file's own bytes. Writing that file
(atomically, last) *is* the commit; deleting it (first) is the start of a
deletion. So "a checkpoint exists iff its row file exists" holds for every
reader, and :meth:`Catalog.committed_keys` is the one place that decides it.

All row files share :data:`CATALOG_SCHEMA`, so the directory reads as one table
with no code of ours::

    duckdb -c "SELECT step, tier, metrics FROM 'runs/demo/catalog/*.parquet'"

The checksum chain. A checksum inside a file cannot cover all of the file, so the
first link lives in the directory: the row file's name holds its CRC, and every
reader checks it before parsing. The row's ``manifest_crc32c`` covers the
checkpoint's ``manifest.parquet``; the manifest covers the ``.index`` (whole
file) and every tensor's bytes. A single flipped byte anywhere in that chain is
found (CRC-32C detects every error burst up to 32 bits) and the error names the
file.

A corrupt or damaged row file does not break the catalog: listing (``table``,
``entries``, ``latest``, ``best``) skips it with a :class:`CorruptCatalogRowWarning`
naming the file and the fix, so restore and resume fall back to the previous
checkpoint; :meth:`Catalog.get` of that step raises, naming the file. A row of
an unknown ``schema_version`` is not damage and still stops the listing with
:class:`~distributed.errors.SchemaVersionError`.

Listing 10,000 small files would be slow, so the writer keeps a compacted copy
of the rows, ``catalog/_compacted/catalog.<crc>.parquet``, whose ``row_file``
column names the exact row file each row came from. It is only an accelerator:
readers take from it just the rows whose row files still exist under that very
name and read the few row files it does not have yet, and a copy that fails its
CRC or its schema is ignored, so a stale, damaged or missing cache can never hide
a committed checkpoint or show a deleted one. Restore re-reads the chosen row
file itself (:meth:`Catalog.get`), so a row file damaged after compaction is
still caught there.

The record format (the row schema, :class:`CatalogEntry`, checked Parquet reads
and writes) is :mod:`~distributed.checkpoint.catalog_format`; this module
decides what is committed and keeps the compacted copy.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from distributed.checkpoint import layout
from distributed.checkpoint.catalog_format import (CATALOG_SCHEMA, SCHEMA_VERSION,
                                                   CatalogEntry, check_schema,
                                                   from_row, read_checked,
                                                   table_bytes, to_table, utc_now)
from distributed.checkpoint.manifest import check_schema_version
from distributed.checkpoint.metric_goal import MetricGoal
from distributed.errors import (CheckpointCorruptError, CheckpointExistsError,
                                CheckpointNotFoundError, ManifestError,
                                SchemaVersionError)

__all__ = ["CATALOG_SCHEMA", "COMPACTED_DIR", "Catalog", "CatalogEntry",
           "CorruptCatalogRowWarning", "utc_now"]

COMPACTED_DIR = "_compacted"
_COMPACTED_RE = re.compile(r"^catalog\.([0-9a-f]{8})\.parquet$")
ROW_FILE_COLUMN = "row_file"
# Rewrite the compacted copy once this many row files are missing from it.
COMPACT_EVERY = 64

# The compacted copy: the rows plus the name of the row file each came from.
COMPACTED_SCHEMA = CATALOG_SCHEMA.append(
    pa.field(ROW_FILE_COLUMN, pa.string(), nullable=False))


class CorruptCatalogRowWarning(UserWarning):
    """A catalog row file is corrupt or damaged; its checkpoint is skipped."""


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

    def _row_names(self) -> dict[tuple[int, str], list[str]]:
        """Every row file name per ``(step, tier)``, checksummed names first."""
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return {}
        rows: dict[tuple[int, str], list[tuple[bool, str]]] = {}
        for name in names:
            parsed = layout.parse_catalog_row_name(name)
            if parsed is not None:
                rows.setdefault(parsed[:2], []).append((parsed[2] is None, name))
        return {k: [n for _, n in sorted(v)] for k, v in rows.items()}

    def committed_keys(self) -> dict[tuple[int, str], str]:
        """``{(step, tier): row file name}`` of every committed checkpoint.

        This is the single definition of "committed" that every reader uses.
        """
        return {k: v[0] for k, v in self._row_names().items()}

    def commit(self, entry: CatalogEntry) -> None:
        """Writes the row file; after this returns the checkpoint exists.

        Raises:
            CheckpointExistsError: A row for this step and tier exists already
                (committed checkpoints are immutable).
        """
        expected = self._layout.relative_checkpoint_path(entry.tier, entry.step)
        if entry.path != expected or entry.run != self._layout.run:
            raise ValueError(f"catalog entry {entry} does not belong at {expected}")
        if entry.key in self.committed_keys():
            raise CheckpointExistsError(
                f"run {self._layout.run!r} already has a committed {entry.tier} "
                f"checkpoint at step {entry.step}")
        os.makedirs(self._dir, exist_ok=True)
        data = table_bytes(to_table([entry]))
        name = layout.catalog_row_name(entry.step, entry.tier,
                                       layout.bytes_crc32c(data))
        layout.atomic_write_bytes(os.path.join(self._dir, name), data)
        self._uncompacted_commits += 1
        if self._uncompacted_commits >= COMPACT_EVERY:
            self.compact()

    def remove(self, step: int, tier: str) -> None:
        """Deletes a row file: from now on the checkpoint does not exist.

        NOTE: retention calls this *before* deleting the checkpoint directory,
        so a crash in between leaves an orphan directory, never a row that
        points at missing data.
        """
        names = self._row_names().get((step, layout.check_tier(tier)), [])
        for name in names:
            try:
                os.unlink(os.path.join(self._dir, name))
            except FileNotFoundError:
                continue
        if names:
            layout.fsync_dir(self._dir)

    # -- reading -----------------------------------------------------------

    def _read_row_file(self, name: str) -> pa.Table:
        """One row file, checked (CRC, version, schema, content), as
        :data:`CATALOG_SCHEMA` columns.

        Raises:
            FileNotFoundError: Not committed (any more): callers handle it.
            CheckpointCorruptError: The bytes fail the CRC in the name.
            SchemaVersionError: Another (e.g. version-1, unchecksummed) format.
            ManifestError: Unreadable, or not the row its name says.
        """
        path = os.path.join(self._dir, name)
        step, tier, crc = layout.parse_catalog_row_name(name)
        if crc is None:
            raise SchemaVersionError(
                f"{path}: catalog row in the version-1 format (no CRC-32C in its "
                f"name); this code reads version {SCHEMA_VERSION}: read the run with "
                "the distributed-tf-ray version that wrote it")
        table = read_checked(
            path, crc, "catalog row file",
            f". Restore the file from a backup, or delete it to drop the {tier} "
            f"checkpoint at step {step} (CheckpointStore.open then removes its "
            "directory); until then readers skip it")
        check_schema_version(table.schema.metadata, path, SCHEMA_VERSION)
        check_schema(table.schema, path)
        rows = table.to_pylist()
        want = self._layout.relative_checkpoint_path(tier, step)
        if (len(rows) != 1 or rows[0]["step"] != step or rows[0]["tier"] != tier
                or rows[0]["path"] != want):
            raise ManifestError(
                f"{path}: catalog row does not describe {tier} step {step} at "
                f"{want}; the file is damaged or was tampered with")
        if any(v is None for k, v in rows[0].items() if k != "metrics"):
            raise ManifestError(f"{path}: catalog row has null fields")
        return table.select(CATALOG_SCHEMA.names).cast(CATALOG_SCHEMA)

    def _read_row_or_skip(self, key: tuple[int, str], name: str) -> pa.Table | None:
        """:meth:`_read_row_file`, or ``None`` (with a warning) for a damaged
        row or one deleted meanwhile, so listing never breaks on one bad file."""
        try:
            return self._read_row_file(name)
        except FileNotFoundError:
            return None  # removed by retention while we listed
        except SchemaVersionError:
            raise  # not damage: this code is too old to read it
        except (CheckpointCorruptError, ManifestError) as e:
            warnings.warn(
                f"skipping the {key[1]} checkpoint at step {key[0]} of run "
                f"{self._layout.run!r}, whose catalog row is damaged: {e}",
                CorruptCatalogRowWarning, stacklevel=3)
            return None

    def _read_compacted(self) -> pa.Table | None:
        """The newest compacted copy that passes its CRC and schema, as
        :data:`COMPACTED_SCHEMA`; ``None`` if there is none (readers then use
        the row files)."""
        directory = os.path.join(self._dir, COMPACTED_DIR)
        try:
            found = [(e.stat().st_mtime_ns, e.name) for e in os.scandir(directory)
                     if _COMPACTED_RE.match(e.name)]
        except FileNotFoundError:
            return None
        for _, name in sorted(found, reverse=True):
            path = os.path.join(directory, name)
            crc = int(_COMPACTED_RE.match(name).group(1), 16)
            try:
                table = read_checked(path, crc, "compacted catalog")
                check_schema_version(table.schema.metadata, path, SCHEMA_VERSION)
                check_schema(table.schema, path, COMPACTED_SCHEMA)
                return table.select(COMPACTED_SCHEMA.names).cast(COMPACTED_SCHEMA)
            except (FileNotFoundError, CheckpointCorruptError, ManifestError,
                    pa.ArrowException, ValueError):
                continue  # only an accelerator: try an older one, or the row files
        return None

    def _rows(self, keys: Mapping[tuple[int, str], str]) -> pa.Table:
        """The rows of ``keys`` (``{key: row file name}``) as
        :data:`COMPACTED_SCHEMA`, sorted by tier, step; damaged rows skipped."""
        parts = []
        have: set[str] = set()
        cached = self._read_compacted() if keys else None
        if cached is not None and cached.num_rows:
            wanted = pa.array(sorted(keys.values()), pa.string())
            cached = cached.filter(pc.is_in(cached[ROW_FILE_COLUMN], value_set=wanted))
            have = set(cached[ROW_FILE_COLUMN].to_pylist())
            parts.append(cached)
        for key in sorted(keys):
            name = keys[key]
            if name in have:
                continue
            table = self._read_row_or_skip(key, name)
            if table is not None:
                parts.append(table.append_column(
                    COMPACTED_SCHEMA.field(ROW_FILE_COLUMN),
                    pa.array([name] * table.num_rows, pa.string())))
        if not parts:
            return COMPACTED_SCHEMA.empty_table()
        table = pa.concat_tables(parts)
        return table.sort_by([("tier", "ascending"), ("step", "ascending")])

    def table(self, tier: str | None = None) -> pa.Table:
        """Every committed checkpoint as one Arrow table, sorted by tier, step.

        A damaged row file is left out with a :class:`CorruptCatalogRowWarning`.
        """
        keys = self.committed_keys()
        if tier is not None:
            layout.check_tier(tier)
            keys = {k: v for k, v in keys.items() if k[1] == tier}
        table = self._rows(keys).drop_columns([ROW_FILE_COLUMN])
        return table.replace_schema_metadata(CATALOG_SCHEMA.metadata)

    def entries(self, tier: str | None = None) -> list[CatalogEntry]:
        """Every committed checkpoint, sorted by tier then step (damaged rows
        left out with a warning)."""
        return [from_row(r) for r in self.table(tier).to_pylist()]

    def get(self, step: int, tier: str = "serving") -> CatalogEntry:
        """The committed checkpoint at ``step``, read from its row file.

        Raises:
            CheckpointNotFoundError: No such committed checkpoint.
            CheckpointCorruptError: Its row file fails its CRC (named, with the fix).
            ManifestError: Its row file is damaged or of an unknown version.
        """
        layout.check_tier(tier)
        keys = self.committed_keys()
        if (step, tier) in keys:
            try:
                return from_row(self._read_row_file(keys[step, tier]).to_pylist()[0])
            except FileNotFoundError:
                pass  # deleted since we listed
        steps = sorted(s for s, t in keys if t == tier and s != step)
        near = ", ".join(map(str, steps[-5:])) or "none"
        raise CheckpointNotFoundError(
            f"run {self._layout.run!r} has no committed {tier} checkpoint at "
            f"step {step} (latest {tier} steps: {near})")

    def latest(self, tier: str = "serving") -> CatalogEntry | None:
        """The committed checkpoint with the highest step whose row file is
        sound (damaged ones are skipped with a warning), or ``None``."""
        layout.check_tier(tier)
        keys = self.committed_keys()
        for step in sorted((s for s, t in keys if t == tier), reverse=True):
            table = self._read_row_or_skip((step, tier), keys[step, tier])
            if table is not None:
                return from_row(table.to_pylist()[0])
        return None

    def best(self, metric: str, mode: str = "min",
             tier: str = "serving") -> CatalogEntry:
        """The committed checkpoint with the lowest (``min``) or highest metric.

        Raises:
            ValueError: ``mode`` is not ``min`` or ``max``.
            CheckpointNotFoundError: No checkpoint of ``tier`` records ``metric``.
        """
        goal = MetricGoal(metric, mode)
        entries = self.entries(tier)
        scored = goal.ranked(entries)
        if not scored:
            recorded = sorted({m for e in entries for m in e.metrics})
            raise CheckpointNotFoundError(
                f"run {self._layout.run!r} has no committed {tier} checkpoint that "
                f"records metric {metric!r}; "
                + (f"its checkpoints record {', '.join(recorded)}" if recorded else
                   f"it has no {tier} checkpoint with metrics yet"))
        return scored[0]

    # -- maintenance -------------------------------------------------------

    def compact_if_stale(self) -> bool:
        """Compacts when :data:`COMPACT_EVERY` or more rows are missing from the
        compacted copy (e.g. after many short-lived writers). Returns whether it did."""
        keys = self.committed_keys()
        cached = self._read_compacted()
        have = set() if cached is None else set(cached[ROW_FILE_COLUMN].to_pylist())
        if len(set(keys.values()) - have) >= COMPACT_EVERY:
            self.compact()
            return True
        return False

    def compact(self) -> None:
        """Writes a fresh compacted copy from the current rows, then deletes
        older copies.

        Crash ordering: the new copy is complete (atomic write) before any old
        one goes, so a crash in between leaves two sound copies; readers take
        the newest that passes its CRC.
        """
        data = table_bytes(self._rows(self.committed_keys()))
        directory = os.path.join(self._dir, COMPACTED_DIR)
        os.makedirs(directory, exist_ok=True)
        name = f"catalog.{layout.crc32c_hex(layout.bytes_crc32c(data))}.parquet"
        layout.atomic_write_bytes(os.path.join(directory, name), data)
        for old in os.listdir(directory):
            if old != name and (_COMPACTED_RE.match(old) or old == "catalog.parquet"):
                try:
                    os.unlink(os.path.join(directory, old))
                except FileNotFoundError:
                    continue
        layout.fsync_dir(directory)
        self._uncompacted_commits = 0

    def stale_tmp_files(self) -> list[str]:
        """Paths of ``*.tmp-*`` files a crashed writer left in the catalog."""
        found = []
        for directory in (self._dir, os.path.join(self._dir, COMPACTED_DIR)):
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            found += [os.path.join(directory, n) for n in names if layout.is_tmp_name(n)]
        return found

    def remove_stale_tmp_files(self) -> list[str]:
        """Deletes ``*.tmp-*`` files left by a crashed writer; returns their paths."""
        removed = self.stale_tmp_files()
        for path in removed:
            os.unlink(path)
        return removed

