"""One run's checkpoints on storage: the commit protocol, cleanup, retention.

The commit protocol (a checkpoint without its catalog row does not exist):

1. ``tmp_created``: make ``checkpoints/<tier>/step-N.tmp-<random>/``.
2. ``tensors_written``: the Saver writes shards and index into it.
3. ``manifest_written``: write ``manifest.parquet`` into it.
4. ``synced``: fsync every file and the directory.
5. ``renamed``: rename it to ``step-N/`` and fsync the tier directory.
6. ``committed``: write the catalog row (tmp name, fsync, rename, fsync).

A crash before 6 leaves a ``*.tmp-*`` directory or an orphan ``step-N/`` with
no row; readers never see either, and :meth:`CheckpointStore.open` removes them.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import time
from typing import Callable, Mapping

from distributed.checkpoint import layout, lease
from distributed.checkpoint.catalog import Catalog, CatalogEntry
from distributed.checkpoint.catalog_format import utc_now
from distributed.checkpoint.manifest import build_manifest_table, manifest_bytes
from distributed.checkpoint.retention import Retention
from distributed.checkpoint.verify import VerifyReport, verify_checkpoint
from distributed.errors import CheckpointExistsError, StorageError

log = logging.getLogger(__name__)

PHASES = ("tmp_created", "tensors_written", "manifest_written", "synced",
          "renamed", "committed")


class CheckpointStore:
    """Reads and writes the checkpoints of one run under a storage root.

    Args:
        storage: Local or NFS directory shared by the cluster.
        run: Run name (a directory under ``storage``).
        clock: Seconds since the epoch, injectable for tests.
        on_phase: Called with each name in :data:`PHASES` as the protocol
            passes it; tests use it to crash the writer at every step.

    NOTE: only one process (the run's coordinator) writes a run at a time.
    """

    def __init__(self, storage: str, run: str,
                 clock: Callable[[], float] | None = None,
                 on_phase: Callable[[str], None] | None = None):
        try:
            self.layout = layout.RunLayout(os.path.abspath(storage), run)
        except ValueError as e:
            raise StorageError(str(e)) from e
        self.catalog = Catalog(self.layout)
        self._clock = clock or time.time
        self._on_phase = on_phase or (lambda phase: None)

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> list[str]:
        """Creates the run's directories and removes a crashed writer's leftovers.

        Returns:
            The paths that were removed.

        Raises:
            StorageError: The storage path cannot be created or written.
        """
        try:
            for tier in layout.TIERS:
                os.makedirs(self.layout.tier_dir(tier), exist_ok=True)
            os.makedirs(self.layout.catalog_dir, exist_ok=True)
            probe = os.path.join(self.layout.root, f".probe{layout.TMP_MARKER}x")
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.unlink(probe)
        except OSError as e:
            raise StorageError(
                f"storage {self.layout.storage!r} is not writable for run "
                f"{self.layout.run!r} ({e.strerror or e}); pass a writable "
                "directory as storage (on a cluster, a mount every node shares)"
            ) from e
        removed = self.remove_leftovers()
        self.catalog.compact_if_stale()
        return removed

    def leftovers(self) -> list[str]:
        """What :meth:`remove_leftovers` would delete, found without writing
        (expired lease files aside)."""
        return self.catalog.stale_tmp_files() + [p for p, _, _ in self._leftover_dirs()]

    def _leftover_dirs(self) -> list[tuple[str, str, int | None]]:
        """``(path, tier, step of an orphan or None)`` of every tmp directory
        and orphan step directory (no catalog row) that no reader holds a
        lease on (see :mod:`~distributed.checkpoint.lease`)."""
        committed = set(self.catalog.committed_keys())
        found = []
        for tier in layout.TIERS:
            tier_dir = self.layout.tier_dir(tier)
            try:
                names = os.listdir(tier_dir)
            except FileNotFoundError:
                continue
            for name in names:
                step = layout.parse_step_dirname(name)
                orphan = step is not None and (step, tier) not in committed
                if orphan and lease.live_leases(self.layout, tier, step):
                    continue
                if layout.is_tmp_name(name) or orphan:
                    found.append((os.path.join(tier_dir, name), tier,
                                  step if orphan else None))
        return found

    def remove_leftovers(self) -> list[str]:
        """Deletes tmp files and directories, orphan step directories no reader
        holds a lease on, and lapsed leases; returns the removed paths."""
        removed = self.catalog.remove_stale_tmp_files()
        for path, tier, orphan_step in self._leftover_dirs():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            if orphan_step is not None:
                lease.clear_deferred(self.layout, tier, orphan_step)
        removed += lease.remove_lapsed(self.layout)
        for path in removed:
            log.info("removed leftover of an interrupted write: %s", path)
        return removed

    # -- writing -----------------------------------------------------------

    def save(self, writer, sess, step: int, tier: str, selection_json: str,
             metrics: Mapping[str, float] | None = None,
             commit: bool = True) -> CatalogEntry:
        """Writes and commits one checkpoint; see the module docstring.

        Args:
            writer: A :class:`~distributed.checkpoint.writer.CheckpointWriter`.
            sess: The Session holding the values to save.
            step: Training step.
            tier: ``serving`` or ``full``.
            selection_json: The selection spec as JSON, recorded in the manifest
                and the catalog.
            metrics: Metrics recorded in the catalog row (e.g. ``loss``).
            commit: ``False`` stops before the catalog row: the directory is
                in place but the checkpoint does not exist until
                :meth:`commit` writes the row (evaluation runs in between).

        Raises:
            CheckpointExistsError: This step/tier is already committed.
            StorageError: Writing failed (disk full, permissions); nothing is
                left visible and the next save may retry.
        """
        layout.check_tier(tier)
        if (step, tier) in self.catalog.committed_keys():
            raise CheckpointExistsError(
                f"run {self.layout.run!r} already has a committed {tier} "
                f"checkpoint at step {step}")
        start = self._clock()
        tier_dir = self.layout.tier_dir(tier)
        self._remove_tmp_dirs(tier_dir)
        tmp = os.path.join(tier_dir, layout.tmp_dirname(step))
        final = self.layout.checkpoint_dir(tier, step)
        try:
            os.makedirs(tmp)
            self._on_phase("tmp_created")
            written = writer.write(sess, tmp)
            self._on_phase("tensors_written")
            import tensorflow as tf  # already loaded by the writer
            # The checksum chain: manifest -> whole index; catalog row -> manifest.
            table = build_manifest_table(list(written.records), {
                "run": self.layout.run, "step": step, "tier": tier,
                "selection": selection_json, "tf_version": tf.__version__,
                "created_at": utc_now(self._clock).isoformat(),
                "index_crc32c": layout.file_crc32c(written.prefix + ".index")})
            manifest = manifest_bytes(table)
            with open(os.path.join(tmp, layout.MANIFEST_FILE), "wb") as f:
                f.write(manifest)
            self._on_phase("manifest_written")
            layout.fsync_tree(tmp)
            self._on_phase("synced")
            if os.path.exists(final):  # an orphan of a crashed earlier attempt
                shutil.rmtree(final)
            os.rename(tmp, final)
            layout.fsync_dir(tier_dir)
            self._on_phase("renamed")
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) or _is_tf_io_error(e):
                raise StorageError(self._write_failure(step, tier, e)) from e
            raise
        num_shards = len({r.shard for r in written.records})
        entry = CatalogEntry(
            run=self.layout.run, step=step, tier=tier,
            path=self.layout.relative_checkpoint_path(tier, step),
            num_tensors=len({r.name for r in written.records}),  # slices count once
            num_bytes=sum(r.length for r in written.records),
            num_shards=num_shards,
            save_seconds=self._clock() - start,
            committed_at=utc_now(self._clock),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            selection=selection_json,
            manifest_crc32c=layout.bytes_crc32c(manifest))
        return self.commit(entry) if commit else entry

    def commit(self, entry: CatalogEntry,
               metrics: Mapping[str, float] | None = None) -> CatalogEntry:
        """Writes the catalog row of a checkpoint :meth:`save` wrote with
        ``commit=False`` (with ``metrics`` added); only now does it exist.

        NOTE: until then the directory is an orphan to :meth:`open`: a crash
        in between loses that checkpoint, never leaves a row without data.
        """
        if metrics:
            entry = dataclasses.replace(entry, metrics={
                **entry.metrics, **{k: float(v) for k, v in metrics.items()}})
        final = self.layout.checkpoint_dir(entry.tier, entry.step)
        try:
            self.catalog.commit(entry)
        except OSError as e:
            # Not committed: the directory is an orphan; remove it now.
            shutil.rmtree(final, ignore_errors=True)
            raise StorageError(self._write_failure(entry.step, entry.tier, e)) from e
        self._on_phase("committed")
        return entry

    @staticmethod
    def _remove_tmp_dirs(tier_dir: str) -> None:
        """Removes tmp directories that earlier saves of this run left.

        A failed save removes its own, so normally there are none; this also
        catches one whose removal failed, without waiting for the next
        :meth:`open`. One writer per run means no other save is in flight.
        """
        try:
            names = os.listdir(tier_dir)
        except OSError:
            return  # the save itself reports what is wrong with the directory
        for name in names:
            if layout.is_tmp_name(name):
                shutil.rmtree(os.path.join(tier_dir, name), ignore_errors=True)
                log.info("removed the leftover of a failed save: %s", name)

    def _write_failure(self, step: int, tier: str, e: BaseException) -> str:
        reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space" in str(e):
            reason = "the disk is full"
        return (f"saving {tier} checkpoint of run {self.layout.run!r} at step "
                f"{step} failed: {reason}. Nothing was committed; free space or "
                f"fix permissions under {self.layout.root} and the next save "
                "will retry")

    # -- reading and maintenance ------------------------------------------

    def checkpoint_dir(self, entry: CatalogEntry) -> str:
        """The directory of a committed checkpoint (from the layout, not the row)."""
        return self.layout.checkpoint_dir(entry.tier, entry.step)

    def verify(self, step: int, tier: str = "serving",
               raise_on_error: bool = True) -> VerifyReport:
        """Verifies a committed checkpoint down the checksum chain: its row
        file, manifest, index and every tensor (see :mod:`.catalog`)."""
        entry = self.catalog.get(step, tier)
        return verify_checkpoint(self.checkpoint_dir(entry), raise_on_error,
                                 entry.manifest_crc32c)

    def apply_retention(self, retention: Retention,
                        tier: str | None = None) -> list[CatalogEntry]:
        """Deletes what ``retention`` decides (for one tier, or all); returns
        the deleted entries.

        Each deletion removes the catalog row first (the checkpoint stops
        existing), then the directory; a crash in between leaves an orphan
        directory that :meth:`open` removes. A directory a reader holds a lease
        on is kept until the lease is released or lapses, and deleted by a
        later call (see :mod:`~distributed.checkpoint.lease`).
        """
        doomed = retention.plan(self.catalog.entries(tier))
        for entry in doomed:
            self.catalog.remove(entry.step, entry.tier)
            if lease.live_leases(self.layout, entry.tier, entry.step):
                lease.defer_deletion(self.layout, entry.tier, entry.step)
                log.info("retention deleted %s checkpoint at step %d from the "
                         "catalog; its files stay until its readers finish",
                         entry.tier, entry.step)
                continue
            shutil.rmtree(self.checkpoint_dir(entry), ignore_errors=True)
            log.info("retention deleted %s checkpoint at step %d",
                     entry.tier, entry.step)
        self.delete_deferred()
        return doomed

    def quarantine(self, step: int, tier: str, reason: str) -> str:
        """Takes a committed checkpoint that failed verification out of use.

        The catalog row goes first (the checkpoint stops existing, so a step
        redone after a restart writes a fresh one instead of keeping it), then
        the directory moves to ``<run>/quarantine/`` with a ``REASON.txt``, for
        inspection; nothing deletes it there. Returns the new path.
        """
        self.catalog.remove(step, tier)
        src = self.layout.checkpoint_dir(tier, step)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        dst = os.path.join(self.layout.quarantine_dir,
                           f"{tier}-{layout.step_dirname(step)}-{stamp}")
        try:
            os.makedirs(self.layout.quarantine_dir, exist_ok=True)
            os.rename(src, dst)
            with open(os.path.join(dst, layout.QUARANTINE_REASON_FILE), "w") as f:
                f.write(reason.rstrip() + "\n")
        except FileNotFoundError:
            return src  # nothing on disk to keep: the row was all there was
        except OSError as e:
            # Unlisted already; an unmovable directory is an orphan that the
            # next open() removes.
            log.warning("could not move %s to quarantine (%s)", src, e)
            return src
        log.warning("quarantined the %s checkpoint at step %d (%s): %s",
                    tier, step, reason, dst)
        return dst

    def delete_deferred(self) -> list[tuple[str, int]]:
        """Deletes the directories retention left for readers that are now done."""
        deleted = []
        committed = set(self.catalog.committed_keys())
        for tier, step in lease.deferred(self.layout):
            if (step, tier) not in committed and \
                    lease.live_leases(self.layout, tier, step):
                continue
            if (step, tier) not in committed:  # committed again after a restart
                shutil.rmtree(self.layout.checkpoint_dir(tier, step), ignore_errors=True)
                deleted.append((tier, step))
            lease.clear_deferred(self.layout, tier, step)
        return deleted


def _is_tf_io_error(e: BaseException) -> bool:
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (tf.errors.ResourceExhaustedError,
                          tf.errors.PermissionDeniedError,
                          tf.errors.UnknownError, tf.errors.DataLossError,
                          tf.errors.NotFoundError, tf.errors.FailedPreconditionError))
