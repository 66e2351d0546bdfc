"""Object storage through ``pyarrow.fs``: paths, streaming copies, clear errors.

:class:`ObjectStore` is a base path on a ``pyarrow.fs`` filesystem (S3, GCS,
Azure, HDFS). It streams files up and down in 16 MiB pieces and checks every
object's size, copies directories with a thread pool, and turns every failure
into one :class:`~distributed.errors.StorageError` that names the URI, the
operation and the fix. It knows nothing of checkpoints:
:mod:`~distributed.storage.remote` builds the commit protocol on it.

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
import os
import secrets
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from distributed.checkpoint import layout
from distributed.errors import StorageError
from distributed.storage import uris

CHUNK = 16 << 20  # bytes per streaming read/write
MAX_BUFFERED = 48 << 20  # per uploading file; pyarrow would otherwise buffer it all
DEFAULT_THREADS = 8

_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One listed entry, named relative to the listed directory."""

    name: str
    size: int | None  # None for a directory (a common prefix)

    @property
    def is_dir(self) -> bool:
        return self.size is None


def connect(uri: str, options: Mapping[str, Any] | None = None
            ) -> tuple[pafs.FileSystem, str, str, str]:
    """Opens the filesystem of ``uri`` (any URI pyarrow.fs understands);
    returns ``(filesystem, base path, uri, endpoint description)``, the
    arguments of :class:`ObjectStore`.

    Args:
        uri: ``s3://bucket/prefix`` (``gs://``, ``abfs://``, ``hdfs://`` too).
        options: ``pyarrow.fs.S3FileSystem`` arguments (``endpoint_override``,
            ``scheme``, ``region``, ``access_key``, ``secret_key``, timeouts,
            ``retry_strategy``); they win over the URI's query and the
            environment. Only ``s3://`` URIs take them.

    Raises:
        StorageError: The URI is malformed or names no bucket.
    """
    if not uris.is_object_store(uri):
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
    return filesystem, base, uri, _describe_endpoint(uri, options)


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


class ObjectStore:
    """A base path on a ``pyarrow.fs`` filesystem; every path is relative to it.

    Paths are POSIX-style and relative (``"<run>/catalog/<row>"``); every
    failure is a :class:`~distributed.errors.StorageError` naming the URI, the
    operation and the fix. Make one from :func:`connect`'s result.
    """

    def __init__(self, filesystem: pafs.FileSystem, base: str, uri: str,
                 endpoint: str = "the endpoint"):
        self.fs = filesystem
        self.base = base.strip("/")
        self.uri = uri
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

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
        return self._delete(rel_path, self.fs.delete_file)

    def _delete(self, rel: str, delete: Callable[[str], None]) -> bool:
        try:
            delete(self.path(rel))
            return True
        except FileNotFoundError:
            return False
        except (OSError, pa.ArrowException) as e:
            raise self._error(f"deleting {rel!r}", e) from e

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
        return self._delete(rel_dir, self.fs.delete_dir)

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
        return sum(parallel(self.upload_file, jobs, threads))

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
        return sum(parallel(self.download_file, jobs, threads))


def parallel(fn: Callable[..., Any], jobs: Iterable[tuple], threads: int) -> list:
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
