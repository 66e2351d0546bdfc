"""``ls``, ``show`` and ``verify``: read-only views of a run's checkpoints.

None of these import TensorFlow: the catalog, the manifests and the checksums
are Arrow, Parquet and CRC-32C, so they answer in well under a second.
"""

from __future__ import annotations

import dataclasses
import os

import pyarrow as pa

from distributed.checkpoint.catalog import Catalog, CatalogEntry
from distributed.checkpoint.manifest import MANIFEST_SCHEMA, Manifest
from distributed.checkpoint.verify import Problem, VerifyReport
from distributed.cli.ckpt.output import Report, format_table, mib, number, timestamp
from distributed.cli.ckpt.run import resolve_tier
from distributed.storage.runstore import RunStore
from distributed.errors import (CheckpointCorruptError, CheckpointNotFoundError,
                                ManifestError)


def ls(store: RunStore, tier: str | None) -> Report:
    """The catalog: one row per committed checkpoint (damaged rows are left
    out with a warning, as every reader does)."""
    run_layout = store.layout
    table = store.catalog.table(tier)
    entries = [CatalogEntry(**{**row, "metrics": dict(row["metrics"] or [])})
               for row in table.to_pylist()]
    metrics = sorted({k for e in entries for k in e.metrics})
    rows = [[e.tier, e.step, e.num_tensors, mib(e.num_bytes), e.num_shards,
             *(number(e.metrics.get(m)) for m in metrics),
             timestamp(e.committed_at), e.path] for e in entries]
    what = f"{tier} checkpoints" if tier else "checkpoints"
    text = (f"run {run_layout.run!r} ({run_layout.root}): {len(entries)} committed "
            f"{what}")
    if entries:
        text += "\n" + format_table(
            ["tier", "step", "tensors", "MiB", "shards", *metrics, "committed_at", "path"],
            rows, "<>>>>" + ">" * len(metrics) + "<<")
    return Report(text, {"run": run_layout.run, "root": run_layout.root,
                         "checkpoints": [e.to_json_dict() for e in entries]}, table)


def scope_of(name: str, depth: int) -> str:
    """The first ``depth`` ``/``-separated parts of a tensor name."""
    return "/".join(name.split("/")[:depth])


def show(store: RunStore, step: int, tier: str | None, depth: int) -> Report:
    """One checkpoint's manifest: every tensor, and bytes per scope.

    The manifest is read down the checksum chain (row file, then the manifest
    against the CRC the row records); the tensors' bytes are not read (an
    object store run's manifest is downloaded alone).
    """
    run_layout = store.layout
    tier = resolve_tier(store.catalog, step, tier)
    entry = store.catalog.get(step, tier)
    manifest = store.read_manifest(entry)
    tensors = [dataclasses.asdict(t) for t in manifest.tensors]
    scopes = _scopes(manifest, depth)
    total = manifest.num_bytes
    sliced = (f" ({len(tensors)} rows: a partitioned variable has one per slice)"
              if len(tensors) > manifest.num_tensors else "")
    head = (f"run {run_layout.run!r}, {tier} checkpoint at step {step}: "
            f"{manifest.num_tensors} tensors{sliced}, {mib(total)} MiB in "
            f"{len(manifest.shards)} shard(s)\ncommitted {timestamp(entry.committed_at)}"
            + "".join(f", {k} {number(v)}" for k, v in sorted(entry.metrics.items()))
            + f"; TensorFlow {manifest.metadata['tf_version']}; selection "
            f"{entry.selection}; {entry.path}")
    tensor_rows = [[t["name"], t["dtype"], list(t["shape"]), t["slice"], t["length"],
                    t["shard"]] for t in tensors]
    scope_rows = [[s["scope"], s["tensors"], s["bytes"], mib(s["bytes"]),
                   f"{100 * s['bytes'] / total:.1f}%" if total else ""] for s in scopes]
    text = "\n\n".join([
        head,
        format_table(["tensor", "dtype", "shape", "slice", "bytes", "shard"],
                     tensor_rows, "<<<<><"),
        f"bytes per scope (depth {depth}):\n" + format_table(
            ["scope", "tensors", "bytes", "MiB", "share"], scope_rows, "<>>>>")])
    document = {"run": run_layout.run, "checkpoint": entry.to_json_dict(),
                "manifest": dict(manifest.metadata), "tensors": tensors,
                "scopes": scopes, "depth": depth}
    table = pa.Table.from_pylist(
        tensors, schema=MANIFEST_SCHEMA).append_column(
        "scope", pa.array([scope_of(t["name"], depth) for t in tensors], pa.string()))
    return Report(text, document, table)


def _scopes(manifest: Manifest, depth: int) -> list[dict]:
    """Tensors (a partitioned one once) and bytes per scope, biggest first."""
    acc: dict[str, list] = {}
    for t in manifest.tensors:
        count = acc.setdefault(scope_of(t.name, depth), [set(), 0])
        count[0].add(t.name)
        count[1] += t.length
    return [{"scope": s, "tensors": len(n), "bytes": b}
            for s, (n, b) in sorted(acc.items(), key=lambda kv: (-kv[1][1], kv[0]))]


VERIFY_SCHEMA = pa.schema([
    pa.field("tier", pa.string()),
    pa.field("step", pa.int64()),
    pa.field("ok", pa.bool_()),
    pa.field("num_tensors", pa.int64()),
    pa.field("num_bytes", pa.int64()),
    pa.field("seconds", pa.float64()),
    pa.field("problems", pa.list_(pa.struct([
        pa.field("path", pa.string()), pa.field("tensor", pa.string()),
        pa.field("message", pa.string())]))),
])


def verify(store: RunStore, step: int | None, tier: str | None) -> Report:
    """Verifies one committed checkpoint (``step``) or all of them, down the
    whole checksum chain, each under a reader lease (an object store run's is
    fetched into its cache first); exit code 1 if any is bad.

    Raises:
        CheckpointNotFoundError: ``step`` is given and not committed.
    """
    run_layout = store.layout
    if step is not None:
        keys = [(resolve_tier(store.catalog, step, tier), step)]
    else:
        keys = sorted((t, s) for s, t in store.catalog.committed_keys()
                      if tier is None or t == tier)
    rows = []
    for t, s in keys:
        with store.reading(t, s):
            try:
                store.fetch(t, s)
                report = store.verify(s, t, raise_on_error=False)
            except CheckpointNotFoundError:
                if step is not None:
                    raise
                continue  # deleted by retention since we listed
            except (CheckpointCorruptError, ManifestError) as e:  # the row file
                report = VerifyReport(run_layout.checkpoint_dir(t, s), 0, 0, 0.0, (
                    Problem(getattr(e, "path", None) or _row_path(store.catalog, s, t),
                            getattr(e, "tensor", None), str(e)),))
        rows.append({"tier": t, "step": s, "ok": report.ok,
                     "num_tensors": report.num_tensors, "num_bytes": report.num_bytes,
                     "seconds": report.seconds,
                     "problems": [dataclasses.asdict(p) for p in report.problems]})
    bad = sum(not r["ok"] for r in rows)
    width = max((len(str(r["step"])) for r in rows), default=0)
    lines = []
    for r in rows:
        where = f"{r['tier']:7} step {r['step']:<{width}}"
        if r["ok"]:
            lines.append(f"OK   {where}  {r['num_tensors']} tensors, "
                         f"{mib(r['num_bytes'])} MiB, {r['seconds']:.2f}s")
        for p in r["problems"]:
            lines.append(f"BAD  {where}  {Problem(**p)}")
    lines.append(f"{bad} of {len(rows)} checkpoint(s) bad" if rows
                 else f"run {run_layout.run!r} has no committed checkpoints")
    document = {"run": run_layout.run, "ok": not bad, "checkpoints": rows}
    return Report("\n".join(lines), document,
                  pa.Table.from_pylist(rows, schema=VERIFY_SCHEMA), 1 if bad else 0)


def _row_path(catalog: Catalog, step: int, tier: str) -> str:
    name = catalog.committed_keys().get((step, tier), "")
    return os.path.join(catalog.directory, name) if name else catalog.directory

