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

Credentials and endpoint come from the usual environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``),
which ``pyarrow.fs.FileSystem.from_uri`` reads itself, or from ``options``
(``S3FileSystem`` arguments), which win.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import os
import re
import secrets
import shutil
import warnings
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from distributed.checkpoint import layout
from distributed.checkpoint.catalog import CorruptCatalogRowWarning
from distributed.errors import (CheckpointCorruptError, CheckpointExistsError,
                                CheckpointNotFoundError, StorageError)

log = logging.getLogger(__name__)

CHUNK = 16 << 20  # bytes per streaming read/write
MAX_BUFFERED = 48 << 20  # per uploading file; pyarrow would otherwise buffer it all
DEFAULT_THREADS = 8
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_remote(storage: str) -> bool:
    """True for a URI with a scheme other than ``file://`` (``s3://b/p``)."""
    m = _SCHEME_RE.match(storage) if isinstance(storage, str) else None
    return bool(m) and m.group(1).lower() != "file"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One listed entry, named relative to the listed directory."""

    name: str
    size: int | None  # None for a directory (a common prefix)

    @property
    def is_dir(self) -> bool:
        return self.size is None


@dataclasses.dataclass(frozen=True)
class CatalogSync:
    """What :meth:`Remote.sync_catalog_down` changed in the local catalog."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    skipped: tuple[str, ...]  # remote rows whose bytes fail their CRC


def open_remote(uri: str, options: Mapping[str, Any] | None = None, *,
                check: bool = True) -> "Remote":
    """Opens the object store named by ``uri`` (any URI pyarrow.fs understands).

    Args:
        uri: ``s3://bucket/prefix`` (``gs://``, ``abfs://``, ``hdfs://`` too).
        options: ``pyarrow.fs.S3FileSystem`` arguments (``endpoint_override``,
            ``scheme``, ``region``, ``access_key``, ``secret_key``, timeouts,
            ``retry_strategy``); they win over the URI's query and the
            environment. Only ``s3://`` URIs take them.
        check: Check now that the bucket exists and answers.

    Raises:
        StorageError: The URI is malformed, names no bucket, the endpoint does
            not answer or the bucket does not exist; the message says which.
    """
    if not is_remote(uri):
        raise StorageError(f"storage {uri!r} is not an object-store URI; use e.g. "
                           "s3://bucket/prefix (a plain path is local storage)")
    options = dict(options or {})
    try:
        filesystem, path = _filesystem(uri, options)
    except (ValueError, TypeError, OSError, pa.ArrowException) as e:
        raise StorageError(
            f"storage {uri!r} cannot be opened: {_first_line(e)}; use a URI such "
            "as s3://bucket/prefix, with the endpoint in AWS_ENDPOINT_URL or the "
            "endpoint_override option") from e
    base = path.strip("/")
    if not base:
        raise StorageError(f"storage {uri!r} names no bucket; use s3://bucket/prefix")
    remote = Remote(filesystem, base, uri, _describe_endpoint(uri, options))
    if check:
        remote.check()
    return remote


def _filesystem(uri: str, options: dict) -> tuple[pafs.FileSystem, str]:
    """pyarrow's own URI rules, or (with options) an ``S3FileSystem`` built from
    the environment's endpoint, the URI's query and ``options``, in that order.

    S3 writes use ``allow_delayed_open``: a small object (a catalog row, a
    manifest) is one PUT, not a three-request multipart upload.
    """
    parts = urlsplit(uri)
    is_s3 = parts.scheme.lower() == "s3"
    if not options:
        if is_s3 and "allow_delayed_open" not in parse_qs(parts.query):
            query = "&".join(filter(None, (parts.query, "allow_delayed_open=true")))
            uri = urlunsplit(parts._replace(query=query))
        return pafs.FileSystem.from_uri(uri)
    if not is_s3:
        raise ValueError(f"options are S3FileSystem arguments, but this is a "
                         f"{parts.scheme}:// URI; put its settings in the URI")
    if not parts.hostname:
        raise ValueError("Missing bucket name in S3 URI")
    kwargs: dict[str, Any] = {"allow_delayed_open": True}
    # S3FileSystem(), unlike from_uri, does not read the endpoint variables.
    endpoint = next((os.environ[k] for k in _ENDPOINT_ENV if os.environ.get(k)), None)
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if parts.username:
        kwargs["access_key"] = unquote(parts.username)
        kwargs["secret_key"] = unquote(parts.password or "")
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        kwargs[key] = {"true": True, "false": False}.get(value.lower(), value)
    kwargs.update(options)
    return pafs.S3FileSystem(**kwargs), parts.netloc.rpartition("@")[2] + parts.path


def _describe_endpoint(uri: str, options: Mapping[str, Any]) -> str:
    """Where requests go, for messages."""
    endpoint = options.get("endpoint_override") or next(
        (os.environ[k] for k in _ENDPOINT_ENV if os.environ.get(k)), None)
    query = dict(parse_qsl(urlsplit(uri).query))
    endpoint = endpoint or query.get("endpoint_override")
    return endpoint or f"the default {urlsplit(uri).scheme}:// endpoint"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


_LOCAL_ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EISDIR)


def _hint(e: BaseException, endpoint: str) -> str:
    """How to fix what ``e`` (a pyarrow or local I/O error) says went wrong."""
    text = str(e)
    if "AWS Error" not in text and getattr(e, "errno", None) in _LOCAL_ERRNOS:
        return "free space or fix permissions on the local disk"
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        return (f"the endpoint {endpoint} does not answer: check it (AWS_ENDPOINT_URL "
                "or the endpoint_override option), the network and the server")
    if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId",
                               "SignatureDoesNotMatch", "INVALID_ACCESS_KEY_ID")):
        return ("the credentials are refused: check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or the access_key/secret_key options) and "
                "that they may read and write the bucket")
    if "NO_SUCH_BUCKET" in text:
        return "the bucket does not exist: create it or fix the storage URI"
    return "check the endpoint, the credentials and that the bucket exists"


class Remote:
    """A base path on a ``pyarrow.fs`` filesystem; every path is relative to it.

    Paths are POSIX-style and relative (``"<run>/catalog/<row>"``); every
    failure is a :class:`~distributed.errors.StorageError` naming the URI, the
    operation and the fix. Use :func:`open_remote` to make one.
    """

    def __init__(self, filesystem: pafs.FileSystem, base: str, uri: str,
                 endpoint: str = "the endpoint"):
        self.fs = filesystem
        self.base = base.strip("/")
        self.uri = uri
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"Remote({self.uri!r})"

    # -- paths and errors ---------------------------------------------------

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel``, refusing absolute and ``..`` paths."""
        if not isinstance(rel, str) or rel.startswith("/") or (rel and any(
                p in ("", ".", "..") for p in rel.split("/"))):
            raise ValueError(f"{rel!r} is not a relative POSIX path under {self.uri}")
        return f"{self.base}/{rel}" if rel else self.base

    def _error(self, what: str, e: BaseException) -> StorageError:
        return StorageError(f"{what} at {self.uri} failed: {_first_line(e)}. "
                            f"Fix: {_hint(e, self.endpoint)}")

    def check(self) -> None:
        """Raises :class:`StorageError` unless the bucket exists and answers."""
        bucket = self.base.split("/")[0]
        try:
            info = self.fs.get_file_info(bucket)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(
                f"storage {self.uri!r} cannot be reached: {_first_line(e)}. "
                f"Fix: {_hint(e, self.endpoint)}") from e
        if info.type == pafs.FileType.NotFound:
            raise StorageError(
                f"storage {self.uri!r}: bucket {bucket!r} does not exist at "
                f"{self.endpoint}; create it (e.g. aws s3 mb s3://{bucket}) or fix "
                "the bucket name in the storage URI")

    def probe_write(self, rel_dir: str) -> None:
        """Writes and deletes one small object under ``rel_dir``, so a job
        fails at start, not at its first checkpoint, when it may not write."""
        probe = f"{rel_dir}/.probe{layout.TMP_MARKER}{secrets.token_hex(4)}"
        self.write_bytes(probe, b"ok")
        self.delete_file(probe)

    # -- single objects -----------------------------------------------------

    def upload_file(self, local_path: str, rel_path: str) -> int:
        """Streams one local file to ``rel_path``; returns its size.

        Checks the stored object's size against the local file's afterwards.
        """
        path = self.path(rel_path)
        try:
            with open(local_path, "rb", buffering=0) as src, \
                    self.fs.open_output_stream(path, compression=None) as dst:
                size, pending = os.fstat(src.fileno()).st_size, 0
                while chunk := src.read(CHUNK):
                    dst.write(chunk)  # queued: parts upload in the background
                    pending += len(chunk)
                    if pending >= MAX_BUFFERED:
                        dst.flush()  # waits for them, bounding the memory held
                        pending = 0
            stored = self.fs.get_file_info(path).size
        except (OSError, pa.ArrowException) as e:
            raise self._error(f"uploading {local_path} to {rel_path!r}", e) from e
        if stored != size:
            raise StorageError(
                f"uploading {rel_path!r} to {self.uri} stored {stored} bytes, not "
                f"{size}; the store is misbehaving: check {self.endpoint}")
        return size

    def write_bytes(self, rel_path: str, data: bytes) -> None:
        """Writes one small object in a single request."""
        try:
            with self.fs.open_output_stream(self.path(rel_path), compression=None) as f:
                f.write(data)
        except (OSError, pa.ArrowException) as e:
            raise self._error(f"writing {rel_path!r}", e) from e

    def read_bytes(self, rel_path: str) -> bytes:
        """Reads one small object whole."""
        try:
            with self.fs.open_input_stream(self.path(rel_path), compression=None) as f:
                return f.read()
        except (OSError, pa.ArrowException) as e:
            raise self._error(f"reading {rel_path!r}", e) from e

    def download_file(self, rel_path: str, local_path: str) -> int:
        """Downloads one object to ``local_path``; returns its size.

        Writes ``<local_path>.tmp-<random>``, checks its size, fsyncs and
        renames it, so a partial download is never mistaken for the file.
        """
        tmp = f"{local_path}{layout.TMP_MARKER}{secrets.token_hex(4)}"
        try:
            with self.fs.open_input_file(self.path(rel_path)) as src, \
                    open(tmp, "wb") as dst:
                size, done = src.size(), 0
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    done += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            if done != size:
                raise OSError(f"got {done} of {size} bytes")
            os.replace(tmp, local_path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, (OSError, pa.ArrowException)):
                raise self._error(f"downloading {rel_path!r} to {local_path}", e) from e
            raise
        return size

    def exists(self, rel: str) -> bool:
        """True if ``rel`` is an object or a non-empty prefix."""
        try:
            return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound
        except (OSError, pa.ArrowException) as e:
            raise self._error(f"looking up {rel!r}", e) from e

    def delete_file(self, rel_path: str) -> bool:
        """Deletes one object; False if it was not there."""
        try:
            self.fs.delete_file(self.path(rel_path))
            return True
        except FileNotFoundError:
            return False
        except (OSError, pa.ArrowException) as e:
            raise self._error(f"deleting {rel_path!r}", e) from e

    # -- directories (prefixes) ---------------------------------------------

    def list(self, rel_dir: str, recursive: bool = False) -> list[RemoteFile]:
        """The entries under ``rel_dir`` sorted by name (``[]`` if there are
        none); recursive listings hold only files, named by relative path."""
        root = self.path(rel_dir)
        try:
            infos = self.fs.get_file_info(
                pafs.FileSelector(root, allow_not_found=True, recursive=recursive))
        except (OSError, pa.ArrowException) as e:
            raise self._error(f"listing {rel_dir!r}", e) from e
        out = []
        for info in infos:
            name = info.path[len(root):].strip("/")
            if info.type == pafs.FileType.File:
                out.append(RemoteFile(name, info.size))
            elif info.type == pafs.FileType.Directory and not recursive:
                out.append(RemoteFile(name, None))
        return sorted(out, key=lambda f: f.name)

    def delete_dir(self, rel_dir: str) -> bool:
        """Deletes every object under ``rel_dir``; False if there were none."""
        if not rel_dir:
            raise ValueError(f"refusing to delete everything under {self.uri}")
        try:
            self.fs.delete_dir(self.path(rel_dir))
            return True
        except FileNotFoundError:
            return False
        except (OSError, pa.ArrowException) as e:
            raise self._error(f"deleting {rel_dir!r}", e) from e

    def upload_dir(self, local_dir: str, rel_dir: str,
                   threads: int = DEFAULT_THREADS) -> int:
        """Uploads every file under ``local_dir``, ``threads`` files at a time;
        returns the bytes uploaded. Stops at the first failure (after the
        uploads in flight end) and raises it."""
        jobs = []
        for dirpath, _, names in os.walk(local_dir):
            rel = os.path.relpath(dirpath, local_dir).replace(os.sep, "/")
            prefix = rel_dir if rel == "." else f"{rel_dir}/{rel}"
            jobs += [(os.path.join(dirpath, n), f"{prefix}/{n}") for n in names]
        # Largest first: the big shards start at once and the tail is short.
        jobs.sort(key=lambda j: -os.path.getsize(j[0]))
        return sum(_parallel(self.upload_file, jobs, threads))

    def download_dir(self, rel_dir: str, local_dir: str,
                     threads: int = DEFAULT_THREADS) -> int:
        """Downloads every object under ``rel_dir`` into ``local_dir`` (made if
        missing), ``threads`` at a time; returns the bytes downloaded.

        Raises:
            StorageError: Nothing is under ``rel_dir``, or a download failed.
        """
        files = self.list(rel_dir, recursive=True)
        if not files:
            raise StorageError(f"{rel_dir!r} at {self.uri} holds no objects")
        jobs = []
        for f in sorted(files, key=lambda f: -f.size):
            local = os.path.join(local_dir, *f.name.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            jobs.append((f"{rel_dir}/{f.name}", local))
        return sum(_parallel(self.download_file, jobs, threads))

    # -- the catalog --------------------------------------------------------

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
        ok = list(_parallel(fetch_row, [(n,) for n in missing], threads))
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


# -- helpers -----------------------------------------------------------------

def _parallel(fn: Callable[..., Any], jobs: Iterable[tuple], threads: int) -> list:
    """``fn(*job)`` for each job on ``threads`` threads, results in job order.

    On the first failure (or an interrupt) the jobs not started are cancelled,
    the running ones finish, and the failure is raised: nothing runs on after
    this returns, so a caller's cleanup never races an upload.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(jobs))))
    try:
        futures = [pool.submit(fn, *job) for job in jobs]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
