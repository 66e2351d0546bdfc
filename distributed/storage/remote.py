"""Checkpoints on object storage: a local staging mirror, published remotely.

TensorFlow writes checkpoints to a local directory, and the local commit
protocol (:mod:`~distributed.checkpoint.store`) commits them there. For a
``storage`` URI such as ``s3://bucket/prefix`` that directory is a *staging
mirror*: :func:`publish_checkpoint` uploads each locally committed checkpoint,
and readers :meth:`Remote.sync_catalog_down` and :func:`fetch_checkpoint` into a
local cache, where the existing local code verifies and reads it. The remote
layout is the local one, under the URI's prefix::

    <prefix>/<run>/checkpoints/<tier>/step-000000100/   the objects
    <prefix>/<run>/catalog/step-000000100.<tier>.<crc>.parquet   the commit record

The commit protocol, remotely. Object stores have no atomic rename, but an
object becomes visible whole or not at all (a PUT or a completed multipart
upload). So the catalog row object *is* the commit, and it is uploaded last,
after every other object of the checkpoint is uploaded and its size checked.
A checkpoint whose upload failed halfway has no row, so no reader sees it;
:func:`publish_checkpoint` deletes what it uploaded (best effort) and
:func:`remove_remote_leftovers` removes what a crash left. Deletion runs the
other way: the row first, then the objects (:func:`unpublish_checkpoint`), so a
row never points at missing objects. Where the row is written but its reply is
lost, publishing raises though the checkpoint is complete and listed; publishing
it again is a no-op. A torn row could only be a store that breaks the
whole-object rule; its name's CRC-32C still catches it, as locally.

The storage layer underneath (streaming, sizes checked, errors with a fix,
credentials from the environment) is :mod:`~distributed.storage.objectstore`;
the run's writer and readers call all this through a
:class:`~distributed.storage.runstore.RunStore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import warnings
from typing import Any, Mapping

from distributed.checkpoint import layout
from distributed.checkpoint.catalog import CorruptCatalogRowWarning
from distributed.storage.objectstore import (DEFAULT_THREADS, ObjectStore,
                                             RemoteFile, parallel, connect)
from distributed.errors import (CheckpointCorruptError, CheckpointExistsError,
                                CheckpointNotFoundError, StorageError)

log = logging.getLogger(__name__)

__all__ = ["CatalogSync", "Remote", "RemoteFile", "fetch_checkpoint", "manifest_rel",
           "open_remote", "publish_checkpoint", "publish_pending",
           "remove_remote_leftovers", "unpublish_checkpoint"]


@dataclasses.dataclass(frozen=True)
class CatalogSync:
    """What :meth:`Remote.sync_catalog_down` changed in the local catalog."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    skipped: tuple[str, ...]  # remote rows whose bytes fail their CRC


def open_remote(uri: str, options: Mapping[str, Any] | None = None, *,
                check: bool = True) -> "Remote":
    """Opens the object store named by ``uri`` for checkpoints (see
    :func:`~distributed.storage.objectstore.connect` for ``uri`` and
    ``options``).

    Args:
        check: Check now that the bucket exists and answers.

    Raises:
        StorageError: The URI is malformed, names no bucket, the endpoint does
            not answer or the bucket does not exist; the message says which.
    """
    remote = Remote(*connect(uri, options))
    if check:
        remote.check()
    return remote


class Remote(ObjectStore):
    """An object store holding runs: the catalog side of the protocol."""

    def catalog_rows(self, run: str) -> dict[tuple[int, str], list[str]]:
        """Every remote catalog row name per ``(step, tier)``: the remote
        "committed" (checksummed names first, as :class:`Catalog` orders them)."""
        rows: dict[tuple[int, str], list[tuple[bool, str]]] = {}
        for f in self.list(_catalog_rel(run)):
            parsed = None if f.is_dir else layout.parse_catalog_row_name(f.name)
            if parsed is not None:
                rows.setdefault(parsed[:2], []).append((parsed[2] is None, f.name))
        return {k: [n for _, n in sorted(v)] for k, v in rows.items()}

    def download_row(self, run: str, name: str, local_catalog_dir: str) -> None:
        """Downloads one catalog row file, checks it against the CRC-32C in its
        name and writes it atomically into ``local_catalog_dir``.

        Raises:
            CheckpointCorruptError: Its bytes fail the CRC (nothing is written).
        """
        rel = f"{_catalog_rel(run)}/{name}"
        data = self.read_bytes(rel)
        crc = layout.parse_catalog_row_name(name)[2]
        if crc is not None and layout.bytes_crc32c(data) != crc:
            raise CheckpointCorruptError(
                f"{self.uri}/{rel}: catalog row file is corrupt: the CRC-32C of its "
                f"bytes does not match its name; re-publish the checkpoint or "
                "delete the row", path=rel)
        layout.atomic_write_bytes(os.path.join(local_catalog_dir, name), data)

    def sync_catalog_down(self, run: str, local_run_root: str,
                          threads: int = DEFAULT_THREADS) -> CatalogSync:
        """Makes ``<local_run_root>/catalog/`` hold exactly the remote row files.

        Downloads the missing ones (each checked against the CRC-32C in its
        name, written atomically) and deletes local ones the remote lacks. A
        remote row that fails its CRC is skipped with a
        :class:`~distributed.checkpoint.CorruptCatalogRowWarning`, as a local
        listing skips it.

        NOTE: for a reader's cache only: in the writer's staging mirror it would
        delete the rows of checkpoints not published yet.
        """
        local_dir = os.path.join(local_run_root, layout.CATALOG_DIR)
        os.makedirs(local_dir, exist_ok=True)
        remote = {n for names in self.catalog_rows(run).values() for n in names}
        local = {n for n in os.listdir(local_dir) if layout.parse_catalog_row_name(n)}

        def fetch_row(name: str) -> bool:
            try:
                self.download_row(run, name, local_dir)
                return True
            except CheckpointCorruptError as e:
                warnings.warn(f"skipping a remote catalog row of run {run!r}: {e}",
                              CorruptCatalogRowWarning, stacklevel=4)
                return False

        missing = sorted(remote - local)
        ok = list(parallel(fetch_row, [(n,) for n in missing], threads))
        removed = sorted(local - remote)
        for name in removed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(local_dir, name))
        if removed:
            layout.fsync_dir(local_dir)
        return CatalogSync(
            added=tuple(n for n, good in zip(missing, ok) if good),
            removed=tuple(removed),
            skipped=tuple(n for n, good in zip(missing, ok) if not good))


# -- checkpoints -------------------------------------------------------------

def _catalog_rel(run: str) -> str:
    return f"{layout.check_run_name(run)}/{layout.CATALOG_DIR}"


def _checkpoint_rel(run: str, tier: str, step: int) -> str:
    return f"{run}/" + layout.RunLayout(".", run).relative_checkpoint_path(tier, step)


def manifest_rel(run: str, tier: str, step: int) -> str:
    """The object path of a checkpoint's manifest, relative to the storage root."""
    return f"{_checkpoint_rel(run, tier, step)}/{layout.MANIFEST_FILE}"


def _local_row(local_run_root: str, run: str, tier: str, step: int) -> str:
    """The local catalog row name of a locally committed checkpoint."""
    catalog_dir = os.path.join(local_run_root, layout.CATALOG_DIR)
    try:
        names = os.listdir(catalog_dir)
    except FileNotFoundError:
        names = []
    found = sorted(n for n in names if (layout.parse_catalog_row_name(n) or ())[:2]
                   == (step, tier))
    if not found:
        raise CheckpointNotFoundError(
            f"run {run!r} has no locally committed {tier} checkpoint at step "
            f"{step} under {local_run_root}; only committed checkpoints are published")
    return found[0]


def publish_checkpoint(remote: Remote, local_run_root: str, run: str, tier: str,
                       step: int, threads: int = DEFAULT_THREADS) -> int:
    """Uploads one locally committed checkpoint, then its catalog row: the
    remote commit. Returns the bytes uploaded (0 if it was published already).

    NOTE: only the run's coordinator calls this, one publish at a time.

    Raises:
        CheckpointNotFoundError: It is not committed locally.
        CheckpointExistsError: Another checkpoint of this step and tier is
            committed remotely (a different row).
        StorageError: An upload failed. The remote catalog does not list it,
            unless only the reply to the row's upload was lost, in which case
            it is listed and complete; publishing again finishes either way.
    """
    row = _local_row(local_run_root, run, tier, step)
    rel_ckpt = _checkpoint_rel(run, tier, step)
    rel_row = f"{_catalog_rel(run)}/{row}"
    published = remote.catalog_rows(run).get((step, tier), [])
    if row in published:
        return 0
    if published:
        raise CheckpointExistsError(
            f"{remote.uri} already has a different {tier} checkpoint of run {run!r} "
            f"at step {step} (row {published[0]}); use a new run name, or "
            "unpublish_checkpoint it first")
    remote.delete_dir(rel_ckpt)  # the leftover of an interrupted upload, if any
    local_ckpt = os.path.join(local_run_root, *rel_ckpt.split("/")[1:])
    row_sent = False
    try:
        uploaded = remote.upload_dir(local_ckpt, rel_ckpt, threads)
        row_sent = True  # from here the row may exist, even if its upload fails
        uploaded += remote.upload_file(
            os.path.join(local_run_root, layout.CATALOG_DIR, row), rel_row)
    except BaseException as e:
        _undo_publish(remote, rel_ckpt, rel_row if row_sent else None)
        if isinstance(e, StorageError):
            raise StorageError(
                f"publishing the {tier} checkpoint of run {run!r} at step {step} "
                f"failed, so it is not committed remotely (the local copy is "
                f"intact; publishing again retries): {e}") from e
        raise
    return uploaded


def publish_pending(remote: Remote, local_run_root: str, run: str,
                    threads: int = DEFAULT_THREADS) -> list[tuple[int, str]]:
    """Publishes, oldest first, every locally committed checkpoint the remote
    catalog lacks (e.g. committed just before a crash); returns their
    ``(step, tier)``.

    NOTE: only the run's coordinator calls this, when no publish is in flight.
    """
    try:
        names = os.listdir(os.path.join(local_run_root, layout.CATALOG_DIR))
    except FileNotFoundError:
        return []
    local = {p[:2] for p in map(layout.parse_catalog_row_name, names) if p}
    pending = sorted(local - set(remote.catalog_rows(run)))
    for step, tier in pending:
        publish_checkpoint(remote, local_run_root, run, tier, step, threads)
    return pending


def _undo_publish(remote: Remote, rel_ckpt: str, rel_row: str | None) -> None:
    """Best-effort removal of a failed publish: the row (if it may have been
    written) first, and the objects only once no row can point at them."""
    try:
        if rel_row is not None:
            remote.delete_file(rel_row)
        remote.delete_dir(rel_ckpt)
    except StorageError as e:
        log.warning("could not remove the partial upload of %s (%s); "
                    "remove_remote_leftovers removes it later", rel_ckpt, e)


def unpublish_checkpoint(remote: Remote, run: str, tier: str, step: int) -> bool:
    """Deletes one remote checkpoint: its row first (it stops existing), then
    its objects; a crash in between leaves objects that
    :func:`remove_remote_leftovers` removes. False if it was not published.

    NOTE: only the run's coordinator calls this (retention). A reader that
    is still downloading it fails, and :func:`fetch_checkpoint` then says the
    checkpoint is gone so the reader picks another.
    """
    names = remote.catalog_rows(run).get((step, layout.check_tier(tier)), [])
    for name in names:
        remote.delete_file(f"{_catalog_rel(run)}/{name}")
    return remote.delete_dir(_checkpoint_rel(run, tier, step)) or bool(names)


def remove_remote_leftovers(remote: Remote, run: str) -> list[str]:
    """Deletes remote step directories with no catalog row (uploads a crash
    interrupted) and anything with a tmp name; returns their relative paths.

    NOTE: only the run's coordinator calls this, when no publish is in flight.
    """
    committed = set(remote.catalog_rows(run))
    removed = []
    for tier in layout.TIERS:
        tier_rel = f"{run}/{layout.CHECKPOINTS_DIR}/{tier}"
        for entry in remote.list(tier_rel):
            step = layout.parse_step_dirname(entry.name)
            orphan = step is not None and (step, tier) not in committed
            if orphan or layout.is_tmp_name(entry.name):
                rel = f"{tier_rel}/{entry.name}"
                if entry.is_dir:
                    remote.delete_dir(rel)
                else:
                    remote.delete_file(rel)
                removed.append(rel)
                log.info("removed the remote leftover of an interrupted upload: %s", rel)
    return removed


def fetch_checkpoint(remote: Remote, run: str, tier: str, step: int,
                     local_run_root: str, threads: int = DEFAULT_THREADS) -> str:
    """Downloads one remote checkpoint into the local mirror; returns its
    directory, where ``verify_checkpoint``/``read_verified`` read it.

    Follows the local commit protocol: objects into ``step-N.tmp-<random>/``,
    fsync, rename to ``step-N/``, then the row file into ``catalog/``. A
    directory already there is returned as is (verify it against its row).

    Raises:
        CheckpointNotFoundError: Not committed remotely, or deleted while
            downloading (retention): pick another checkpoint.
        CheckpointCorruptError: Its remote row fails its CRC.
        StorageError: A download failed.
    """
    rel_ckpt = _checkpoint_rel(run, tier, step)
    rows = remote.catalog_rows(run).get((step, layout.check_tier(tier)))
    if not rows:
        raise CheckpointNotFoundError(
            f"{remote.uri} has no committed {tier} checkpoint of run {run!r} at "
            f"step {step}")
    final = os.path.join(local_run_root, *rel_ckpt.split("/")[1:])
    if not os.path.isdir(final):
        tier_dir = os.path.dirname(final)
        os.makedirs(tier_dir, exist_ok=True)
        tmp = os.path.join(tier_dir, layout.tmp_dirname(step))
        try:
            remote.download_dir(rel_ckpt, tmp, threads)
            layout.fsync_dir(tmp)
            _rename_unless_there(tmp, final)
            layout.fsync_dir(tier_dir)
        except StorageError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if (step, tier) not in remote.catalog_rows(run):
                raise CheckpointNotFoundError(
                    f"the {tier} checkpoint of run {run!r} at step {step} was "
                    f"deleted from {remote.uri} while it downloaded (retention); "
                    "pick another checkpoint") from e
            raise
    catalog_dir = os.path.join(local_run_root, layout.CATALOG_DIR)
    if not os.path.exists(os.path.join(catalog_dir, rows[0])):
        os.makedirs(catalog_dir, exist_ok=True)
        remote.download_row(run, rows[0], catalog_dir)
    return final


def _rename_unless_there(tmp: str, final: str) -> None:
    """Renames ``tmp`` to ``final``; if another reader got there first, keeps
    theirs and removes ``tmp``."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
