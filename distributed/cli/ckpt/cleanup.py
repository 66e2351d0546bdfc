"""``gc``: apply retention and remove leftovers, outside a training run.

The store does the work (:meth:`CheckpointStore.open` removes a crashed
writer's leftovers, :meth:`CheckpointStore.apply_retention` deletes what a
:class:`Retention` decides, catalog row first, and respects reader leases);
this module picks the retention (flags, or the run's recorded one), plans a
dry run, and refuses to run beside a live writer when it can tell.

NOTE: a run has one writer. ``gc`` is a second one, so it must not run while
the run trains: it could delete a checkpoint the trainer has renamed into place
but not yet committed. There is no writer lock to check, so :func:`last_write`
looks for the trainer's footprints instead (fresh catalog rows, in-flight
``*.tmp-*`` saves, a fresh ``run_config.json``); that catches a run that saved
recently, not one that saves rarely.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

from distributed import config as config_lib
from distributed.checkpoint import layout, lease
from distributed.checkpoint.catalog import COMPACTED_DIR
from distributed.checkpoint.layout import RunLayout
from distributed.checkpoint.retention import KeepEveryKSteps, KeepLastN, Retention
from distributed.checkpoint.store import CheckpointStore
from distributed.cli.ckpt.output import Report, mib
from distributed.errors import ConfigError, DistributedError, ManifestError
from distributed.checkpoint.layout import RUN_CONFIG_FILE

# A run that wrote within this many seconds may still be training.
ACTIVE_WINDOW = 600.0


class RunMayBeTrainingError(DistributedError, RuntimeError):
    """The run wrote recently; ``gc`` refuses unless forced."""


def recorded_retention(run_layout: RunLayout) -> dict[str, Retention]:
    """The retention the run trains with, per tier, from its ``run_config.json``.

    Raises:
        ConfigError: The run recorded no config (pass retention flags).
        ManifestError: The record is unreadable or its retention is invalid.
    """
    path = os.path.join(run_layout.root, RUN_CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            recorded = json.loads(f.read()).get("config", {})
    except FileNotFoundError:
        raise ConfigError(
            f"run {run_layout.run!r} has no {RUN_CONFIG_FILE} recording its retention; "
            "pass --keep-last, --keep-every or --keep-best") from None
    except (OSError, ValueError, AttributeError) as e:
        raise ManifestError(f"{path}: unreadable run record ({e})") from None
    # Only the retention: the rest of an older run's config may not validate now.
    config = config_lib.from_dict(
        {"retention": recorded["retention"]} if "retention" in recorded else {})
    # The trainer applies retention only to the tiers its config names.
    return {t: config.retention.get(t, Retention()) for t in layout.TIERS}


def retention_from_flags(flags: Mapping[str, Any]) -> Retention | None:
    """A :class:`Retention` from ``--keep-*`` flags, or ``None`` if none was given."""
    given = {k: v for k, v in flags.items() if v is not None}
    return Retention.from_dict(given, field="gc") if given else None


def describe(retention: Retention) -> str:
    """``keep_last=5, keep_best=3 by loss (min)``; ``keep all`` for no rules."""
    parts = []
    for rule in retention.rules:
        if isinstance(rule, KeepLastN):
            parts.append(f"keep_last={rule.n}")
        elif isinstance(rule, KeepEveryKSteps):
            parts.append(f"keep_every={rule.k}")
        else:
            parts.append(f"keep_best={rule.n} by {rule.metric} ({rule.mode})")
    return ", ".join(parts) or "keep all"


def last_write(run_layout: RunLayout) -> tuple[float, str] | None:
    """``(mtime, path)`` of the trainer's newest footprint: a catalog row, an
    in-flight ``*.tmp-*`` save or ``run_config.json``; ``None`` if none."""
    found = []
    dirs = [run_layout.catalog_dir, os.path.join(run_layout.catalog_dir, COMPACTED_DIR),
            *(run_layout.tier_dir(t) for t in layout.TIERS)]
    for directory in dirs:
        try:
            scan = list(os.scandir(directory))
        except OSError:
            continue
        for e in scan:
            written = (layout.is_tmp_name(e.name)
                       or layout.parse_catalog_row_name(e.name) is not None)
            if written:
                try:
                    found.append((e.stat(follow_symlinks=False).st_mtime, e.path))
                except FileNotFoundError:
                    continue
    record = os.path.join(run_layout.root, RUN_CONFIG_FILE)
    if os.path.exists(record):
        found.append((os.path.getmtime(record), record))
    return max(found) if found else None


def _check_idle(run_layout: RunLayout, now: float) -> str | None:
    """Why gc is unsafe now (the run wrote within :data:`ACTIVE_WINDOW`), or ``None``."""
    last = last_write(run_layout)
    if last is not None and now - last[0] < ACTIVE_WINDOW:
        return (f"run {run_layout.run!r} wrote {max(0.0, now - last[0]):.0f}s ago "
                f"({last[1]}), so it may still be training; gc must not run beside "
                "the trainer (one writer per run). Stop the run first, or pass "
                "--force if it is not training")
    return None


def gc(store: CheckpointStore, retention: Retention | None, tier: str | None,
       dry_run: bool, force: bool, clock: Callable[[], float] = time.time) -> Report:
    """Applies ``retention`` (``None``: the run's recorded one) to ``tier`` (or
    both) and removes leftovers; with ``dry_run`` only says what it would do.

    Raises:
        RunMayBeTrainingError: The run wrote recently and ``force`` is off.
    """
    run_layout = store.layout
    tiers = [tier] if tier else list(layout.TIERS)
    if retention is None:
        policies, source = recorded_retention(run_layout), RUN_CONFIG_FILE
    else:
        policies, source = {t: retention for t in layout.TIERS}, "flags"
    policies = {t: policies[t] for t in tiers}
    busy = _check_idle(run_layout, clock())
    if busy and not (force or dry_run):
        raise RunMayBeTrainingError(busy)
    if dry_run:
        result = _plan(store, policies)
    else:
        result = _apply(store, policies)
    result.update(run=run_layout.run, dry_run=dry_run, retention_source=source,
                  retention={t: describe(r) for t, r in policies.items()})
    return Report(_text(result, busy if dry_run else None), result)


def _deleted_row(entry, kept_for_readers: bool) -> dict:
    return {"tier": entry.tier, "step": entry.step, "num_bytes": entry.num_bytes,
            "files_kept_for_readers": kept_for_readers}


def _apply(store: CheckpointStore, policies: Mapping[str, Retention]) -> dict:
    # open() also deletes the files retention left for readers that are done
    # (they are orphans by then), so delete_deferred has nothing left to do.
    leftovers = store.open()
    deleted = []
    for tier, retention in policies.items():
        gone = store.apply_retention(retention, tier)
        waiting = set(lease.deferred(store.layout))  # leased: files stay for now
        deleted += [_deleted_row(e, (e.tier, e.step) in waiting) for e in gone]
    return {"deleted": deleted, "leftovers": sorted(leftovers)}


def _plan(store: CheckpointStore, policies: Mapping[str, Retention]) -> dict:
    """What :func:`_apply` would do, found without writing anything (expired
    lease files, which :func:`_apply` also removes, are not listed)."""
    leftovers = store.leftovers()
    deleted = [_deleted_row(e, bool(lease.live_leases(store.layout, e.tier, e.step)))
               for t, r in policies.items() for e in r.plan(store.catalog.entries(t))]
    return {"deleted": deleted, "leftovers": sorted(leftovers)}


def _text(result: dict, warning: str | None) -> str:
    verb = "would " if result["dry_run"] else ""
    lines = [f"gc of run {result['run']!r}, retention from "
             f"{result['retention_source']}: "
             + "; ".join(f"{t} {d}" for t, d in result["retention"].items())]
    for d in result["deleted"]:
        kept = (" (from the catalog; its files stay until its readers finish and "
                "go on a later gc)" if d["files_kept_for_readers"] else "")
        lines.append(f"  {verb}delete {d['tier']} step {d['step']} "
                     f"({mib(d['num_bytes'])} MiB){kept}")
    for path in result["leftovers"]:
        lines.append(f"  {verb}remove leftover {path}")
    if len(lines) == 1:
        lines.append("  nothing to delete")
    if result["dry_run"]:
        lines.append("dry run: nothing was deleted")
        if warning:
            lines.append(f"warning: {warning}")
    return "\n".join(lines)
