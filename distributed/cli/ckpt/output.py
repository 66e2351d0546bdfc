"""How subcommands answer: aligned tables for people, JSON and Parquet for scripts.

Each subcommand returns a :class:`Report` holding all three forms; :func:`emit`
prints the one asked for, so a command never needs to know which that was.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from typing import Any, Sequence, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from distributed.errors import StorageError


@dataclasses.dataclass
class Report:
    """What a subcommand found.

    Attributes:
        text: For people (the default output).
        document: For ``--json``: one JSON document.
        table: For ``--parquet``: one row per checkpoint, tensor or problem;
            ``None`` for commands without one (``gc``).
        exit_code: The process's exit status (``verify`` returns 1 on damage).
    """

    text: str
    document: dict
    table: pa.Table | None = None
    exit_code: int = 0


def emit(report: Report, as_json: bool, parquet_path: str | None,
         out: TextIO) -> int:
    """Writes ``report`` (JSON or text to ``out``, the table to ``parquet_path``);
    returns its exit code.

    Raises:
        StorageError: The Parquet file cannot be written.
    """
    if parquet_path:
        try:
            pq.write_table(report.table, parquet_path)
        except OSError as e:
            raise StorageError(f"--parquet: cannot write {parquet_path!r} "
                               f"({e.strerror or e})") from None
    if as_json:
        out.write(json.dumps(json_safe(report.document), indent=2, allow_nan=False))
        out.write("\n")
    else:
        out.write(report.text.rstrip("\n") + "\n")
    return report.exit_code


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``null``, datetimes as ISO 8601 and
    tuples as lists, so the document is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 align: str) -> str:
    """An aligned text table; ``align`` holds ``<`` or ``>`` per column."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.ljust(w) if a == "<" else c.rjust(w)
                 for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f}"


def number(value: float | None) -> str:
    """A metric or difference in a few significant digits; blank for ``None``."""
    return "" if value is None else f"{value:.4g}"


def timestamp(when: _dt.datetime) -> str:
    """UTC time to the second, as tables show it."""
    return when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
