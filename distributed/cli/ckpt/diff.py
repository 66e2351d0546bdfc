"""``diff``: which tensors changed between two checkpoints, and by how much.

Both checkpoints are read with the verified reader (every tensor's CRC-32C is
checked, so a diff never reports on damaged bytes) under reader leases. Only
tensors whose CRC-32C differs are loaded and compared; equal CRC-32Cs (same
dtype and shape) are reported unchanged without comparing values. A
partitioned variable is compared as the one logical tensor it is: unchanged
when every slice's CRC-32C is, else loaded whole (so a table saved in other
slices with the same values is unchanged, not changed). No
TensorFlow: manifest dtypes map to numpy ones (``bfloat16`` via ``ml_dtypes``
when it is installed); values of other dtypes (``string``) are reported as
changed or not by their checksums only.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from distributed.checkpoint.manifest import TensorRecord
from distributed.checkpoint.verify import read_committed_manifest, read_verified
from distributed.cli.ckpt.output import Report, format_table, number
from distributed.cli.ckpt.run import resolve_tier
from distributed.storage.runstore import RunStore

# Statuses, in the order the human table lists them.
STATUSES = ("changed", "retyped", "only_a", "only_b", "unchanged")
_LABELS = {"changed": "changed", "retyped": "retyped", "only_a": "only in A",
           "only_b": "only in B", "unchanged": "unchanged"}
_QUANTIZED = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}

DIFF_SCHEMA = pa.schema([
    pa.field("name", pa.string()),
    pa.field("status", pa.string()),
    pa.field("dtype_a", pa.string()),
    pa.field("shape_a", pa.list_(pa.int64())),
    pa.field("dtype_b", pa.string()),
    pa.field("shape_b", pa.list_(pa.int64())),
    pa.field("max_abs_diff", pa.float64()),
    pa.field("rel_l2_change", pa.float64()),
])


def numpy_dtype(name: str):
    """The numpy dtype of a manifest dtype name, or ``None`` if numpy has none."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    if name == "string":
        return None
    return np.dtype(_QUANTIZED.get(name, name))


def change(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(max |b - a|, ||b - a|| / ||a||)`` in float64; the relative change is
    ``inf`` when ``a`` is all zeros and ``b`` is not."""
    wide = np.complex128 if np.iscomplexobj(a) else np.float64
    delta = b.astype(wide).ravel() - a.astype(wide).ravel()
    max_abs = float(np.abs(delta).max()) if delta.size else 0.0
    moved = float(np.linalg.norm(delta))
    base = float(np.linalg.norm(a.astype(wide).ravel()))
    return max_abs, (moved / base if base else (0.0 if moved == 0 else math.inf))


def diff(store: RunStore, step_a: int, step_b: int, tier: str | None,
         show_all: bool = False) -> Report:
    """Compares checkpoint A (``step_a``) with B (``step_b``) tensor by tensor,
    both under reader leases (an object store run's are fetched into its
    cache first).

    Raises:
        CheckpointNotFoundError: Either step is not committed.
        CheckpointCorruptError: Either checkpoint fails verification.
    """
    run_layout = store.layout
    tier_a = resolve_tier(store.catalog, step_a, tier)
    tier_b = resolve_tier(store.catalog, step_b, tier)
    with store.reading(tier_a, step_a), store.reading(tier_b, step_b):
        store.fetch(tier_a, step_a)
        store.fetch(tier_b, step_b)
        dir_a, man_a = read_committed_manifest(run_layout, step_a, tier_a)
        dir_b, man_b = read_committed_manifest(run_layout, step_b, tier_b)
        a, b = man_a.by_name(), man_b.by_name()
        wanted = [n for n in sorted(a.keys() & b.keys())
                  if _same_layout(a[n][0], b[n][0]) and _crcs(a[n]) != _crcs(b[n])
                  and numpy_dtype(a[n][0].dtype) is not None]
        values_a = read_verified(dir_a, man_a, wanted, numpy_dtype)
        values_b = read_verified(dir_b, man_b, wanted, numpy_dtype)
    rows = [_row(n, a.get(n), b.get(n), values_a, values_b)
            for n in sorted(a.keys() | b.keys())]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    name_a, name_b = f"{tier_a} step {step_a}", f"{tier_b} step {step_b}"
    summary = (f"run {run_layout.run!r}: A = {name_a}, B = {name_b}: "
               + ", ".join(f"{counts[s]} {_LABELS[s]}" for s in STATUSES if counts[s]))
    shown = sorted((r for r in rows if show_all or r["status"] != "unchanged"),
                   key=lambda r: (STATUSES.index(r["status"]), r["name"]))
    text = summary
    if shown:
        text += "\n" + format_table(
            ["status", "tensor", "dtype", "shape", "max|B-A|", "rel L2 change"],
            [[_LABELS[r["status"]], r["name"], *_layout_cells(r),
              number(r["max_abs_diff"]), number(r["rel_l2_change"])] for r in shown],
            "<<<<>>")
    document = {"run": run_layout.run, "a": {"tier": tier_a, "step": step_a},
                "b": {"tier": tier_b, "step": step_b}, "counts": counts,
                "tensors": rows}
    return Report(text, document, pa.Table.from_pylist(rows, schema=DIFF_SCHEMA))


def _same_layout(a: TensorRecord, b: TensorRecord) -> bool:
    return (a.dtype, a.shape) == (b.dtype, b.shape)


def _crcs(rows) -> tuple:
    """A tensor's slices and their CRC-32Cs: equal means equal bytes."""
    return tuple((r.slice, r.crc32c) for r in rows)


def _row(name: str, rows_a, rows_b, values_a: dict, values_b: dict) -> dict:
    """One tensor's comparison (all its rows), as a :data:`DIFF_SCHEMA` row."""
    a, b = rows_a and rows_a[0], rows_b and rows_b[0]
    row = {"name": name,
           "dtype_a": a and a.dtype, "shape_a": a and list(a.shape),
           "dtype_b": b and b.dtype, "shape_b": b and list(b.shape),
           "max_abs_diff": None, "rel_l2_change": None}
    if b is None:
        row["status"] = "only_a"
    elif a is None:
        row["status"] = "only_b"
    elif not _same_layout(a, b):
        row["status"] = "retyped"
    elif _crcs(rows_a) == _crcs(rows_b) or (
            name in values_a and _same_bytes(values_a[name], values_b[name])):
        row.update(status="unchanged", max_abs_diff=0.0, rel_l2_change=0.0)
    else:
        row["status"] = "changed"
        if name in values_a:
            row["max_abs_diff"], row["rel_l2_change"] = change(values_a[name],
                                                               values_b[name])
    return row


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (a partitioned table written in other slices)."""
    return a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8),
                                                 b.reshape(-1).view(np.uint8))


def _layout_cells(row: dict) -> list[str]:
    """The dtype and shape cells: one side's, or ``A -> B`` when they differ."""
    a = (row["dtype_a"], row["shape_a"])
    b = (row["dtype_b"], row["shape_b"])
    if row["status"] == "retyped":
        return [f"{a[0]} -> {b[0]}" if a[0] != b[0] else a[0],
                f"{a[1]} -> {b[1]}" if a[1] != b[1] else str(a[1])]
    dtype, shape = b if row["status"] != "only_a" else a
    return [dtype, str(shape)]
