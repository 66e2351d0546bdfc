"""The restore job's logic: export once, or watch the catalog and keep exporting."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from distributed.errors import ConfigError
from distributed.progress import StatusLine
from distributed.serving.export import (candidate_checkpoints, export_first_good,
                                        list_versions, load_run_record,
                                        parse_scope_maps, prune_versions)
from distributed.storage.runstore import open_reader


def restore_once(storage: str, run: str, export: str, step: int | None = None,
                 best: str | None = None, maps: Sequence[str] = (),
                 model: str | None = None, echo: Callable[[str], None] = print,
                 storage_options: Mapping[str, Any] | None = None,
                 cache: str | None = None):
    """Picks, verifies, restores and exports one checkpoint; returns the result.

    ``storage`` may be an object store URI: the run is then read through a
    local cache mirror (``cache``; see
    :func:`~distributed.storage.runstore.open_reader`).
    """
    if step is not None and best:
        raise ConfigError("--step and --best are exclusive: pick one")
    scope_maps = parse_scope_maps(maps)
    t0 = time.perf_counter()
    source = open_reader(storage, run, storage_options, cache)
    record = load_run_record(source)
    t_catalog = time.perf_counter()
    candidates = candidate_checkpoints(source.catalog, step=step, best=best)
    t_chosen = time.perf_counter()
    result = export_first_good(source, export, candidates, record, scope_maps,
                               model, fallback=step is None, echo=echo)
    split = {"load config": t_catalog - t0, "catalog": t_chosen - t_catalog,
             **result.seconds}
    echo(f"exported serving checkpoint at step {result.step} of run {run!r} to "
         f"{result.export_dir} in {time.perf_counter() - t0:.2f}s ("
         + ", ".join(f"{k} {v:.2f}s" for k, v in split.items()) + ")")
    echo("serving_default signature (feed inputs as the input function yields "
         "them: same dtypes and preprocessing):")
    for line in result.describe_signature():
        echo(line)
    return result


def watch(storage: str, run: str, export: str, maps: Sequence[str] = (),
          model: str | None = None, keep: int = 3, poll_seconds: float = 10.0,
          echo: Callable[[str], None] = print,
          stop: threading.Event | None = None,
          storage_options: Mapping[str, Any] | None = None,
          cache: str | None = None) -> int:
    """Exports each new committed serving checkpoint until SIGTERM/SIGINT.

    Returns the number of versions exported.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    source = open_reader(storage, run, storage_options, cache)
    record = load_run_record(source)
    scope_maps = parse_scope_maps(maps)
    catalog = source.catalog
    exported = 0
    status = StatusLine()
    echo = status.wrap(echo)
    echo(f"watching run {run!r} for new serving checkpoints (every {poll_seconds:g}s); "
         "Ctrl-C or SIGTERM to stop")
    while not stop.is_set():
        try:
            source.sync()
        except Exception as e:  # an unreachable store: keep watching
            echo(f"WARNING: could not read the catalog: {e}")
        latest = catalog.latest("serving")
        done = set(list_versions(export))
        if latest is not None and latest.step not in done and \
                (not done or latest.step > max(done)):
            try:
                fresh = [e for e in candidate_checkpoints(catalog)
                         if not done or e.step > max(done)]
                result = export_first_good(source, export, fresh, record,
                                           scope_maps, model, echo=echo)
                exported += 1
                echo(f"exported step {result.step} as version {result.version}")
                pruned = prune_versions(export, keep)
                if pruned:
                    echo(f"removed old versions {pruned} (keeping {keep})")
            except Exception as e:  # keep watching; report and retry next poll
                echo(f"WARNING: export failed: {e}")
        newest = max(list_versions(export), default=None)
        deadline = time.monotonic() + poll_seconds
        while not stop.is_set() and time.monotonic() < deadline:
            status.update(f"watching {run!r}: newest exported version "
                          f"{newest if newest is not None else '(none)'}; next poll in "
                          f"{deadline - time.monotonic():.0f}s")
            stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
    status.clear()
    echo(f"stopped watching; exported {exported} version(s)")
    return exported
