"""One run's storage, as its writer or a reader sees it: :class:`RunStore`.

A run lives in a local (or NFS) directory, or on an object store through a
local mirror. Which of the two is decided here, once, when the store is opened
(:func:`open_writer` for the coordinator, :func:`open_reader` for the restore
job and the checkpoint CLI, :func:`open_offline_writer` for ``ckpt gc``); from
then on every caller uses the same operations, and the object-store classes
carry the publishing:

=======================  ==========================  ==================================
operation                a directory                 an object store (local mirror)
=======================  ==========================  ==================================
``open()``  (writer)     make the directories,       then remove interrupted uploads,
                         remove leftovers            publish what a crash left
                                                     unpublished, take the remote catalog
``save``/``commit``      write the catalog row       then publish: data, the row last
``apply_retention``      the row, then the files     then unpublish: row, then objects
``quarantine``           out of the catalog          and out of the remote catalog
``put_file(rel)``        nothing (already there)     upload the run's local file
``sync()``               nothing                     the local catalog := the remote one
``fetch(tier, step)``    the directory, as it is     downloaded into the mirror first
``read_manifest``        from the directory          the manifest alone, downloaded
``reading(tier, step)``  a reader lease, or one warning where none can be written
=======================  ==========================  ==================================

The object-store protocol itself (the row last, deletion row first, the CRC in
the row's name) is :mod:`~distributed.storage.remote`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Any, Iterator, Mapping

from distributed.checkpoint import layout
from distributed.checkpoint.catalog import CatalogEntry
from distributed.checkpoint.layout import RUN_CONFIG_FILE, TENSORBOARD_DIR
from distributed.checkpoint.lease import Lease
from distributed.checkpoint.manifest import Manifest, read_manifest
from distributed.checkpoint.retention import Retention
from distributed.checkpoint.store import CheckpointStore
from distributed.errors import CheckpointNotFoundError, ConfigError, StorageError
from distributed.storage import uris
from distributed.storage.remote import (Remote, fetch_checkpoint, manifest_rel,
                                        open_remote, publish_pending,
                                        remove_remote_leftovers, unpublish_checkpoint)

log = logging.getLogger(__name__)

__all__ = ["RunStore", "open_offline_writer", "open_reader", "open_writer"]


class RunStore(CheckpointStore):
    """One run's storage: a :class:`CheckpointStore` on a local or NFS
    directory, where every publishing operation has nothing to do.

    The object-store subclasses override those operations, so callers hold a
    ``RunStore`` and never ask which kind it is. Open one with
    :func:`open_writer`, :func:`open_reader` or :func:`open_offline_writer`.
    """

    def __init__(self, storage: str, run: str):
        super().__init__(storage, run)
        self._warned_without_lease = False

    def check_writable(self) -> None:
        """Makes the local storage directory (not the run's) and writes a probe
        file in it, so a job fails before it starts anything when it cannot.

        Raises:
            StorageError: The directory cannot be made or written.
        """
        path = self.layout.storage
        try:
            os.makedirs(path, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StorageError(
                f"storage: cannot write to {path!r} ({e.strerror or e}); point "
                "--storage or the config's storage at a writable directory that every "
                "node mounts at the same path") from None

    def sync(self) -> None:
        """Brings the local catalog up to date with the run's storage of record
        (a directory is its own)."""

    def fetch(self, tier: str, step: int) -> str:
        """Makes a committed checkpoint readable locally; returns its directory
        (verify it against its row before trusting it)."""
        return self.layout.checkpoint_dir(tier, step)

    def read_manifest(self, entry: CatalogEntry) -> Manifest:
        """The manifest of a committed checkpoint, checked against the CRC-32C
        its row records, without reading its tensors."""
        return read_manifest(self.checkpoint_dir(entry), entry.manifest_crc32c)

    def put_file(self, rel_path: str) -> None:
        """Publishes a file the run wrote under its local root
        (``run_config.json``, TensorBoard events); ``rel_path`` is POSIX-style,
        relative to the run root. In a directory it is in place already."""

    @contextlib.contextmanager
    def reading(self, tier: str, step: int) -> Iterator[None]:
        """Holds a reader lease on one checkpoint, so the run's retention
        leaves its files alone while they are read (see
        :mod:`~distributed.checkpoint.lease`).

        NOTE: callers look the checkpoint up in the catalog *inside* this
        block; that order is what makes the lease safe. Where no lease can be
        written (read-only storage) reading goes on without one, with one
        warning per store: a checkpoint retention deletes meanwhile then fails
        its read.
        """
        held: Lease | None = Lease(self.layout, tier, step)
        try:
            held.acquire()
        except OSError as e:
            if not self._warned_without_lease:
                log.warning("cannot take a reader lease under %s (%s): reading without "
                            "one; if retention deletes a checkpoint meanwhile, its read "
                            "fails", self.layout.root, e)
                self._warned_without_lease = True
            held = None
        try:
            yield
        finally:
            if held is not None:
                held.release()


class _MirroredRun(RunStore):
    """A run on an object store, read and written through a local mirror."""

    def __init__(self, mirror: str, run: str, remote: Remote):
        super().__init__(mirror, run)
        self.remote = remote

    def fetch(self, tier: str, step: int) -> str:
        return fetch_checkpoint(self.remote, self.layout.run, tier, step, self.layout.root)

    def read_manifest(self, entry: CatalogEntry) -> Manifest:
        with tempfile.TemporaryDirectory(prefix="dtr-manifest-") as tmp:
            self.remote.download_file(
                manifest_rel(self.layout.run, entry.tier, entry.step),
                os.path.join(tmp, layout.MANIFEST_FILE))
            return read_manifest(tmp, entry.manifest_crc32c)


class _CachedRun(_MirroredRun):
    """A reader's mirror (its own cache, never a writer's staging mirror):
    its catalog follows the remote one; checkpoints come down on demand and
    stay, so a second look is local."""

    def sync(self) -> None:
        self.remote.sync_catalog_down(self.layout.run, self.layout.root)


class _PublishedRun(_MirroredRun):
    """The writer's staging mirror: TensorFlow writes and commits here, and
    each commit is then published; the remote catalog is the truth.

    NOTE: only the run's coordinator holds one, and publishes one at a time.
    """

    def open(self) -> list[str]:
        removed = super().open()
        self.remote.probe_write(self.layout.run)  # fail now, not at the first commit
        removed += remove_remote_leftovers(self.remote, self.layout.run)
        self.sync()
        return removed + self.remove_leftovers()  # directories the remote dropped

    def sync(self) -> None:
        """Publishes what is committed only here first (a crash or a failed
        upload left it), since taking the remote catalog alone would drop it."""
        publish_pending(self.remote, self.layout.root, self.layout.run)
        self.remote.sync_catalog_down(self.layout.run, self.layout.root)

    def commit(self, entry: CatalogEntry,
               metrics: Mapping[str, float] | None = None) -> CatalogEntry:
        entry = super().commit(entry, metrics)
        # Also any checkpoint an earlier failed upload left unpublished.
        publish_pending(self.remote, self.layout.root, self.layout.run)
        return entry

    def apply_retention(self, retention: Retention,
                        tier: str | None = None) -> list[CatalogEntry]:
        deleted = super().apply_retention(retention, tier)
        for gone in deleted:
            unpublish_checkpoint(self.remote, self.layout.run, gone.tier, gone.step)
        return deleted

    def quarantine(self, step: int, tier: str, reason: str) -> str:
        where = super().quarantine(step, tier, reason)
        unpublish_checkpoint(self.remote, self.layout.run, tier, step)
        return where

    def put_file(self, rel_path: str) -> None:
        self.remote.upload_file(os.path.join(self.layout.root, *rel_path.split("/")),
                                f"{self.layout.run}/{rel_path}")


def open_writer(storage: str, run: str, options: Mapping[str, Any] | None = None,
                staging: str | None = None) -> RunStore:
    """The store of the run's one writer (its coordinator): ``storage``
    itself, or an object store written through the staging mirror under
    ``staging`` (default: the temp dir's ``dtr-staging/``). Call
    :meth:`~RunStore.open` before writing.

    Raises:
        StorageError: The object store cannot be reached or its bucket does
            not exist (the message says which); a bad run name.
    """
    if uris.is_object_store(storage):
        return _PublishedRun(uris.staging_path(storage, staging), run,
                             open_remote(storage, options))
    return RunStore(uris.local_path(storage), run)


def open_reader(storage: str, run: str, options: Mapping[str, Any] | None = None,
                cache: str | None = None) -> RunStore:
    """The store of an existing run for a reader (the restore job, the
    checkpoint CLI). An object store's run is read through a local cache
    mirror (one directory per storage URI under ``cache``, by default the temp
    dir's ``dtr-cache/``; never a training job's staging mirror): its run
    record and catalog are synced now, checkpoints by :meth:`~RunStore.fetch`.
    Call :meth:`~RunStore.sync` before each new look at the catalog.

    Raises:
        ConfigError: ``storage`` or ``run`` is malformed, or ``cache`` is a
            training job's staging mirror.
        CheckpointNotFoundError: No such run (the message says where it looked).
        StorageError: The object store is unreachable or refuses access.
    """
    uris.check_storage(storage)
    if not uris.is_object_store(storage):
        return _existing_run(storage, run)
    _check_run_name(run)
    store = _CachedRun(uris.staging_path(storage, cache or uris.DEFAULT_CACHE), run,
                       open_remote(storage, options))
    root = store.layout.root
    if os.path.isdir(os.path.join(root, TENSORBOARD_DIR)):  # only writers make it
        raise ConfigError(
            f"--cache: {store.layout.storage} holds the staging mirror that the "
            f"training job of run {run!r} writes; a reader's cache must be a "
            "directory of its own (leave --cache out for the default)")
    record = f"{run}/{RUN_CONFIG_FILE}"
    if not store.remote.exists(record):
        raise CheckpointNotFoundError(
            f"run {run!r} not found in {storage} (no {RUN_CONFIG_FILE}); check "
            "--storage and --run")
    os.makedirs(store.layout.catalog_dir, exist_ok=True)
    store.remote.download_file(record, os.path.join(root, RUN_CONFIG_FILE))
    store.sync()
    return store


def open_offline_writer(storage: str, run: str) -> RunStore:
    """The store of an existing run for a second writer that runs while the
    run does not train (``ckpt gc``): a directory only.

    Raises:
        ConfigError: ``storage`` is an object store, where the training job
            alone deletes (retention, interrupted uploads); or malformed.
        CheckpointNotFoundError: No such run.
    """
    uris.check_storage(storage)
    if uris.is_object_store(storage):
        raise ConfigError(
            f"gc: {storage} is an object store; there the training job's retention "
            "deletes checkpoints (catalog row first) and a restarted run removes "
            "interrupted uploads. gc works on a directory")
    return _existing_run(storage, run)


def _check_run_name(run: str) -> None:
    try:
        layout.check_run_name(run)
    except ValueError as e:
        raise ConfigError(f"--run: {e}") from None


def _existing_run(storage: str, run: str) -> RunStore:
    """A run in a directory, checked to be there first, so nothing is ever
    created under a mistyped ``--storage`` or ``--run``."""
    _check_run_name(run)
    store = RunStore(uris.local_path(storage), run)
    root = store.layout.storage
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(
            f"storage {root} does not exist; pass the run's --storage directory")
    if not (os.path.isdir(store.layout.catalog_dir)
            or os.path.isfile(os.path.join(store.layout.root, RUN_CONFIG_FILE))):
        there = _runs_under(root)
        raise CheckpointNotFoundError(
            f"run {run!r} not found under {root} (no {layout.CATALOG_DIR}/ or "
            f"{RUN_CONFIG_FILE} in {store.layout.root}); runs there: "
            f"{', '.join(there) if there else 'none'}; check --storage and --run")
    return store


def _runs_under(root: str, limit: int = 10) -> list[str]:
    """Names of up to ``limit`` runs under a storage root, for error messages."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    runs = [n for n in names
            if os.path.isdir(os.path.join(root, n, layout.CATALOG_DIR))]
    return runs[:limit] + (["..."] if len(runs) > limit else [])
