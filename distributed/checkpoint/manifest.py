"""The per-checkpoint manifest: an Arrow table stored as ``manifest.parquet``.

One row per tensor: where its bytes are (``shard``, ``offset``, ``length``) and
what they must be (``dtype``, ``shape``, ``crc32c``), copied from TensorFlow's
own ``.index`` entries so a reader can verify or stream a checkpoint with no
TensorFlow. ``crc32c`` is the plain (unmasked) CRC-32C of the tensor's bytes;
TensorFlow's index stores the same value masked.

A partitioned variable is one logical tensor with a row per slice: every row
has the logical ``name`` and the whole tensor's ``shape``, and ``slice`` says
which block of it the row's bytes are, in TensorFlow's syntax (``0,525000:-``;
see :mod:`~distributed.checkpoint.slices`). ``slice`` is null for an unsliced
tensor. A reader checks that the slices of each tensor tile it exactly.

Schema metadata: ``schema_version``, ``run``, ``step``, ``tier``, ``selection``
(JSON), ``tf_version``, ``created_at`` and ``index_crc32c``: the CRC-32C of the
whole ``model.ckpt.index`` file (8 hex digits), so a flip anywhere in the index,
footer included, is caught, not only in its checksummed blocks.

The manifest is one link of a checksum chain: the catalog row's name holds the
CRC-32C of the row's bytes, the row holds the manifest's (``manifest_crc32c``),
the manifest holds the index's and every tensor's. :func:`read_manifest` checks
the manifest's CRC when given it; readers that start from the catalog
(``CheckpointStore.verify``, the restore job) always give it.

Manifests come from shared storage, so :func:`read_manifest` treats them as
untrusted: unknown versions, missing metadata, unknown dtypes, nulls, paths that
would leave the checkpoint directory (``..``, absolute, symlinks out), and
impossible offsets/lengths are rejected with :class:`ManifestError`. Nothing
read from storage is unpickled; Parquet and protobuf are parsed as data.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from distributed.checkpoint import layout, slices
from distributed.errors import (CheckpointCorruptError, ManifestError, SchemaVersionError,
                                SliceLayoutError)

# 2: adds ``index_crc32c`` to the metadata (the catalog row records this file's CRC).
# 3: adds the ``slice`` column: a row per slice of a partitioned variable.
SCHEMA_VERSION = "3"
# Versions read_manifest reads; a version-2 manifest has no ``slice`` column.
READABLE_VERSIONS = ("2", "3")
_FORMAT = "distributed-tf-ray/manifest"

MANIFEST_SCHEMA = pa.schema([
    pa.field("name", pa.string(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    pa.field("shape", pa.list_(pa.int64()), nullable=False),
    pa.field("trainable", pa.bool_(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("length", pa.int64(), nullable=False),
    pa.field("crc32c", pa.uint32(), nullable=False),
    pa.field("slice", pa.string(), nullable=True),
])
# The columns of a version-2 manifest (no slices).
_V2_FIELDS = tuple(f for f in MANIFEST_SCHEMA if f.name != "slice")

_METADATA_KEYS = ("schema_version", "run", "step", "tier", "selection",
                  "tf_version", "created_at", "index_crc32c")
_HEX8_RE = re.compile(r"^[0-9a-f]{8}$")

# Bytes per element of fixed-size dtypes; others (string) are variable-length.
DTYPE_SIZES = {
    "bool": 1, "int8": 1, "uint8": 1, "qint8": 1, "quint8": 1,
    "int16": 2, "uint16": 2, "float16": 2, "bfloat16": 2,
    "int32": 4, "uint32": 4, "float32": 4, "qint32": 4,
    "int64": 8, "uint64": 8, "float64": 8, "complex64": 8, "complex128": 16,
}
# Every dtype a manifest may name; anything else is damage or tampering.
KNOWN_DTYPES = frozenset(DTYPE_SIZES) | {"string"}

# The only file names a manifest may point at: TF data shards, no directories.
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+\.data-\d{5}-of-\d{5}$")


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One manifest row: a tensor, or one slice of a partitioned one.

    ``shape`` is the whole tensor's; ``slice`` (TensorFlow slice syntax) says
    which block of it the bytes are, or is ``None`` for an unsliced tensor.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    trainable: bool
    shard: str
    offset: int
    length: int
    crc32c: int
    slice: str | None = None

    @property
    def extents(self) -> slices.Extents:
        """``(start, length)`` per dimension of the block this row holds (the
        whole tensor when unsliced). Raises ``ValueError`` on a bad slice."""
        if self.slice is None:
            return tuple((0, d) for d in self.shape)
        return slices.parse_slice(self.slice, self.shape)

    @property
    def label(self) -> str:
        """How messages name the row: ``'emb' (slice 0,3:-)`` or ``'w'``."""
        return repr(self.name) + (f" (slice {self.slice})" if self.slice else "")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated manifest.

    Attributes:
        tensors: Rows, in name order (a partitioned variable's slices by start).
        metadata: The schema metadata (``step`` stays a string as stored).
    """

    tensors: tuple[TensorRecord, ...]
    metadata: Mapping[str, str]

    @property
    def step(self) -> int:
        return int(self.metadata["step"])

    @property
    def tier(self) -> str:
        return self.metadata["tier"]

    @property
    def index_crc32c(self) -> int:
        """CRC-32C of the whole ``.index`` file, as written."""
        return int(self.metadata["index_crc32c"], 16)

    @property
    def num_bytes(self) -> int:
        return sum(t.length for t in self.tensors)

    @property
    def num_tensors(self) -> int:
        """Logical tensors (a partitioned variable counts once)."""
        return len({t.name for t in self.tensors})

    def by_name(self) -> dict[str, tuple[TensorRecord, ...]]:
        """Each logical tensor's rows (one, or one per slice)."""
        out: dict[str, list[TensorRecord]] = {}
        for t in self.tensors:
            out.setdefault(t.name, []).append(t)
        return {name: tuple(rows) for name, rows in out.items()}

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple(sorted({t.shard for t in self.tensors}))


def build_manifest_table(records: list[TensorRecord],
                         metadata: Mapping[str, Any]) -> pa.Table:
    """Builds the Arrow table; ``metadata`` must hold every key but ``schema_version``
    (``index_crc32c`` as an int)."""
    missing = [k for k in _METADATA_KEYS if k != "schema_version" and k not in metadata]
    if missing:
        raise ValueError(f"manifest metadata lacks {missing}")
    records = sorted(records, key=_row_order)
    columns = {f.name: [getattr(r, f.name) for r in records] for f in MANIFEST_SCHEMA}
    columns["shape"] = [list(s) for s in columns["shape"]]
    meta = {k: str(v) for k, v in metadata.items()}
    meta["index_crc32c"] = layout.crc32c_hex(int(metadata["index_crc32c"]))
    meta.update(schema_version=SCHEMA_VERSION, format=_FORMAT)
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA.with_metadata(meta))


def manifest_bytes(table: pa.Table) -> bytes:
    """Serializes a manifest table to Parquet bytes."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue()


def _row_order(r: TensorRecord):
    """Name, then slice starts as numbers (``"10,2"`` after ``"9,1"``)."""
    starts = tuple(int(x) if x.isdigit() else -1
                   for x in re.split(r"[,:]", r.slice)) if r.slice else ()
    return r.name, starts


def check_schema_version(metadata: Mapping[bytes, bytes] | None, what: str,
                         supported: str | tuple[str, ...]) -> dict[str, str]:
    """Decodes Arrow schema metadata and rejects an unknown ``schema_version``
    (``supported``: the one version, or the versions, this reader knows)."""
    try:
        meta = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
    except UnicodeDecodeError as e:
        raise ManifestError(f"{what}: its schema metadata is not UTF-8 ({e}); the "
                            "file is damaged") from None
    version = meta.get("schema_version")
    if version is None:
        raise ManifestError(f"{what}: no schema_version in its metadata; it was "
                            "not written by this project or is damaged")
    known = (supported,) if isinstance(supported, str) else supported
    if version not in known:
        raise SchemaVersionError(
            f"{what}: schema_version {version!r} is not supported (this code reads "
            f"version {' or '.join(known)}); upgrade distributed-tf-ray to read it")
    return meta


def read_manifest(checkpoint_dir: str,
                  expected_crc32c: int | None = None) -> Manifest:
    """Reads and validates ``<checkpoint_dir>/manifest.parquet``.

    Args:
        checkpoint_dir: The checkpoint directory.
        expected_crc32c: The CRC-32C the catalog row records for the file; when
            given, any changed byte is caught before the file is parsed.

    Raises:
        CheckpointCorruptError: The bytes do not match ``expected_crc32c``.
        ManifestError: The file is missing, unreadable, of another schema, or
            describes bytes outside the checkpoint directory or its files.
    """
    path = os.path.join(checkpoint_dir, layout.MANIFEST_FILE)
    safe_member_path(checkpoint_dir, layout.MANIFEST_FILE, f"{path}: manifest")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise ManifestError(f"{path}: manifest is missing") from e
    except OSError as e:
        raise ManifestError(f"{path}: manifest is unreadable ({e})") from e
    if expected_crc32c is not None:
        actual = layout.bytes_crc32c(data)
        if actual != expected_crc32c:
            raise CheckpointCorruptError(
                f"{path}: manifest is corrupt: the CRC-32C of its bytes is "
                f"{actual:#010x} but the catalog row records {expected_crc32c:#010x}",
                path=path)
    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{path}: manifest is unreadable ({e})") from e
    meta = check_schema_version(table.schema.metadata, path, READABLE_VERSIONS)
    _check_metadata(meta, path)
    fields = _V2_FIELDS if meta["schema_version"] == "2" else tuple(MANIFEST_SCHEMA)
    for field in fields:
        if field.name not in table.column_names:
            raise ManifestError(f"{path}: column {field.name!r} is missing")
        if not table.schema.field(field.name).type.equals(field.type):
            raise ManifestError(
                f"{path}: column {field.name!r} has type "
                f"{table.schema.field(field.name).type}, expected {field.type}")
    records = []
    for row in table.select([f.name for f in fields]).to_pylist():
        if (any(v is None for k, v in row.items() if k != "slice")
                or None in row["shape"]):
            raise ManifestError(f"{path}: tensor {row.get('name')!r} has null fields")
        row["shape"] = tuple(row["shape"])
        records.append(TensorRecord(**row))
    _validate_records(records, checkpoint_dir, path)
    return Manifest(tensors=tuple(sorted(records, key=_row_order)), metadata=meta)


def _check_metadata(meta: Mapping[str, str], path: str) -> None:
    """Rejects a manifest whose schema metadata lacks a key or holds nonsense."""
    missing = [k for k in _METADATA_KEYS if k not in meta]
    if missing or meta.get("format") != _FORMAT:
        raise ManifestError(
            f"{path}: metadata lacks {missing or ['format']}; the file was not "
            "written by this project or is damaged")
    step, tier = meta["step"], meta["tier"]
    if not step.isdigit() or tier not in layout.TIERS:
        raise ManifestError(f"{path}: metadata step {step!r} / tier {tier!r} "
                            f"is not a step number and one of {layout.TIERS}")
    if not _HEX8_RE.match(meta["index_crc32c"]):
        raise ManifestError(f"{path}: metadata index_crc32c "
                            f"{meta['index_crc32c']!r} is not 8 hex digits")


def expected_length(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of fixed-size ``dtype`` must occupy; ``None`` if variable."""
    size = DTYPE_SIZES.get(dtype)
    return None if size is None else size * math.prod(shape)


def safe_member_path(checkpoint_dir: str, name: str, what: str) -> str:
    """``checkpoint_dir/name``, after refusing a symlink that resolves anywhere
    but directly in ``checkpoint_dir`` (so no read ever leaves the checkpoint).

    Raises:
        ManifestError: ``name`` resolves outside ``checkpoint_dir``; the message
            starts with ``what``.
    """
    base = os.path.realpath(checkpoint_dir)
    full = os.path.realpath(os.path.join(base, name))
    if os.path.dirname(full) != base:
        raise ManifestError(
            f"{what} {name!r} resolves to {full}, outside {base} (a symlink out "
            "of the checkpoint); refusing to read it")
    return os.path.join(checkpoint_dir, name)


def safe_shard_path(checkpoint_dir: str, shard: str, what: str) -> str:
    """Resolves a manifest's shard name to a path that stays inside the directory.

    Raises:
        ManifestError: Absolute paths, separators, ``..``, names that are not TF
            data shards, or symlinks resolving outside ``checkpoint_dir``.
    """
    if (not _SHARD_NAME_RE.match(shard) or os.path.isabs(shard)
            or "/" in shard or "\\" in shard or shard in (".", "..")):
        raise ManifestError(
            f"{what}: shard path {shard!r} is not a plain data-shard file name "
            "inside the checkpoint directory; refusing to read it")
    return safe_member_path(checkpoint_dir, shard, f"{what}: shard")


def _validate_records(records: list[TensorRecord], checkpoint_dir: str,
                      path: str) -> None:
    keys = set()
    by_shard: dict[str, list[TensorRecord]] = {}
    for r in records:
        if (r.name, r.slice) in keys:
            raise ManifestError(f"{path}: tensor {r.label} appears twice")
        keys.add((r.name, r.slice))
        if r.dtype not in KNOWN_DTYPES:
            raise ManifestError(
                f"{path}: tensor {r.name!r} has unknown dtype {r.dtype!r} (known: "
                f"{', '.join(sorted(KNOWN_DTYPES))})")
        safe_shard_path(checkpoint_dir, r.shard, path)
        if r.offset < 0 or r.length < 0 or any(d < 0 for d in r.shape):
            raise ManifestError(
                f"{path}: tensor {r.label} has a negative offset, length or dim")
        try:
            block = slices.slice_shape(r.extents)
        except ValueError as e:
            raise SliceLayoutError(f"{path}: tensor {r.name!r}: {e}") from None
        want = expected_length(r.dtype, block)
        if want is not None and want != r.length:
            raise ManifestError(
                f"{path}: tensor {r.label} is {r.dtype}{list(block)} = {want} "
                f"bytes but the manifest says {r.length}")
        by_shard.setdefault(r.shard, []).append(r)
    _validate_slices(records, path)
    for shard, rows in by_shard.items():
        rows.sort(key=lambda r: r.offset)
        for a, b in zip(rows, rows[1:]):
            if a.offset + a.length > b.offset:
                raise ManifestError(
                    f"{path}: tensors {a.name!r} and {b.name!r} overlap in {shard}")


def _validate_slices(records: list[TensorRecord], path: str) -> None:
    """Each logical tensor: one unsliced row, or slices of one dtype and shape
    that tile it exactly (so a restore never reads a gap or one element twice)."""
    groups: dict[str, list[TensorRecord]] = {}
    for r in records:
        groups.setdefault(r.name, []).append(r)
    for name, rows in groups.items():
        if len(rows) == 1 and rows[0].slice is None:
            continue
        if any(r.slice is None for r in rows):
            raise SliceLayoutError(
                f"{path}: tensor {name!r} has both an unsliced row and slices")
        if len({(r.dtype, r.shape, r.trainable) for r in rows}) > 1:
            raise SliceLayoutError(
                f"{path}: the slices of {name!r} disagree on dtype, shape or "
                "trainable")
        gap = slices.uncovered(rows[0].shape, [r.extents for r in rows])
        if gap:
            raise SliceLayoutError(
                f"{path}: the slices of partitioned variable {name!r} "
                f"{list(rows[0].shape)} do not cover it: {gap}. The checkpoint is "
                "incomplete or damaged; restore an earlier checkpoint (the restore "
                "job falls back to one unless --step names this one)")
