"""Finding a run and its checkpoints from command-line arguments.

Every subcommand starts here, so an unknown run, a bad name or a step that is
not committed is one clear error, and nothing is created under a mistyped
``--storage`` or ``--run``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Iterator, Mapping

from distributed import config as config_lib
from distributed.checkpoint import layout
from distributed.checkpoint.catalog import Catalog
from distributed.checkpoint.lease import Lease
from distributed.checkpoint.layout import RunLayout
from distributed.errors import CheckpointNotFoundError, ConfigError
from distributed.checkpoint.layout import RUN_CONFIG_FILE

log = logging.getLogger(__name__)


def storage_path(value: str) -> str:
    """``--storage`` resolved exactly as the train job resolves ``storage``
    (``file://`` URIs, ``~``, relative paths), with the same errors."""
    return config_lib.from_dict({"storage": value}).storage_path


def resolve_run(storage: str, run: str) -> RunLayout:
    """The layout of an existing run.

    Raises:
        ConfigError: ``run`` is not a valid run name, or ``storage`` is not a
            supported storage path.
        CheckpointNotFoundError: No such run under ``storage`` (the message
            lists the runs that are there).
    """
    root = storage_path(storage)
    try:
        run_layout = RunLayout(root, run)
    except ValueError as e:
        raise ConfigError(f"--run: {e}") from None
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(
            f"storage {root} does not exist; pass the run's --storage directory")
    if not (os.path.isdir(run_layout.catalog_dir)
            or os.path.isfile(os.path.join(run_layout.root, RUN_CONFIG_FILE))):
        there = _runs_under(root)
        raise CheckpointNotFoundError(
            f"run {run!r} not found under {root} (no {layout.CATALOG_DIR}/ or "
            f"{RUN_CONFIG_FILE} in {run_layout.root}); runs there: "
            f"{', '.join(there) if there else 'none'}. Check --storage and --run")
    return run_layout


@dataclasses.dataclass
class RemoteRun:
    """A run on an object store, read through a local cache mirror.

    The catalog is synced into the mirror when the run is opened; checkpoints
    are downloaded on demand by :meth:`fetch` (kept in the cache, so a second
    look is local).
    """

    layout: RunLayout  # of the mirror
    remote: Any

    def fetch(self, tier: str, step: int) -> None:
        from distributed.storage.remote import fetch_checkpoint
        fetch_checkpoint(self.remote, self.layout.run, tier, step, self.layout.root)

    def fetch_manifest(self, tier: str, step: int, into: str) -> str:
        """Downloads only the checkpoint's manifest into directory ``into``."""
        from distributed.storage.remote import manifest_rel
        self.remote.download_file(manifest_rel(self.layout.run, tier, step),
                                  os.path.join(into, layout.MANIFEST_FILE))
        return into


def open_remote_run(storage: str, run: str, options: Mapping[str, str],
                    cache: str | None) -> RemoteRun:
    """Syncs an object store run's record and catalog into the local cache.

    Raises:
        ConfigError: ``run`` is not a valid run name, or ``cache`` is a
            training job's staging mirror.
        CheckpointNotFoundError: No such run in ``storage``.
        StorageError: The object store is unreachable or refuses access.
    """
    from distributed.serving.export import open_storage
    local, remote = open_storage(storage, run, options, cache)
    return RemoteRun(RunLayout(local, run), remote)


def _runs_under(root: str, limit: int = 10) -> list[str]:
    """Names of up to ``limit`` runs under a storage root, for error messages."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    runs = [n for n in names
            if os.path.isdir(os.path.join(root, n, layout.CATALOG_DIR))]
    return runs[:limit] + (["..."] if len(runs) > limit else [])


def resolve_tier(catalog: Catalog, step: int, tier: str | None) -> str:
    """``tier``, or when it is ``None`` the tier that has ``step`` committed
    (``serving`` first); ``serving`` when neither has, so the lookup that
    follows reports the step as not committed."""
    if tier is not None:
        return tier
    keys = catalog.committed_keys()
    return next((t for t in layout.TIERS if (step, t) in keys), layout.TIERS[0])


@contextlib.contextmanager
def reading(run_layout: RunLayout, tier: str, step: int) -> Iterator[None]:
    """Holds a reader lease on one checkpoint, so the run's retention leaves
    its files alone while we read them (see
    :mod:`~distributed.checkpoint.lease`).

    NOTE: callers look the checkpoint up in the catalog *inside* this block;
    that order is what makes the lease safe. On storage we cannot write to,
    reading goes on without a lease, as the restore job does.
    """
    held: Lease | None = Lease(run_layout, tier, step)
    try:
        held.acquire()
    except OSError as e:
        log.warning("cannot take a reader lease under %s (%s): reading without one",
                    run_layout.root, e)
        held = None
    try:
        yield
    finally:
        if held is not None:
            held.release()
