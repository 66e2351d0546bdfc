"""Where a run's storage is: a local (or shared, NFS) directory, or an object
store URI written through a local mirror.

This is the one place that decides "is this an object store" and where its
local mirror lives; everything else asks :func:`is_object_store` and
:func:`local_path`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import Any

from distributed.errors import ConfigError

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")


DEFAULT_STAGING = os.path.join(tempfile.gettempdir(), "dtr-staging")
# Readers (the restore job, the CLI) keep their own mirror: syncing a reader's
# catalog down in the writer's staging mirror would drop rows not uploaded yet.
DEFAULT_CACHE = os.path.join(tempfile.gettempdir(), "dtr-cache")


def staging_path(storage: str, staging: str | None = None) -> str:
    """The local mirror of object store ``storage`` under ``staging``
    (one directory per storage URI)."""
    digest = hashlib.sha256(storage.encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(os.path.expanduser(staging or DEFAULT_STAGING)),
                        digest)


def is_object_store(storage: Any) -> bool:
    """True for ``s3://``, ``gs://`` and the other object-store URIs."""
    if not isinstance(storage, str):
        return False
    scheme, sep, _ = storage.partition("://")
    return bool(sep) and scheme.lower() in OBJECT_STORE_SCHEMES


def check_storage(value: Any) -> None:
    """Storage is a directory path, a ``file:///abs/path`` URI, or an object
    store URI ``pyarrow.fs`` opens (checked for form only, no network)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"storage: expected a directory path, got {value!r}; use "
                          "e.g. /mnt/shared/runs (a mount every node shares)")
    scheme, sep, rest = value.partition("://")
    if not sep:
        return
    if scheme == "file":
        if not rest.startswith("/"):
            raise ConfigError(
                f"storage: {value!r} is not a file URI with an absolute path; use "
                "file:///abs/path (three slashes) or a plain directory path")
        return
    if not _SCHEME_RE.fullmatch(scheme):
        raise ConfigError(
            f"storage: {value!r} is neither a directory path nor a URI (no valid "
            "scheme before '://'); use a directory path such as /mnt/shared/runs")
    if scheme.lower() not in OBJECT_STORE_SCHEMES:
        raise ConfigError(
            f"storage: {scheme}:// storage ({value!r}) is not supported; use "
            f"{', '.join(s + '://bucket/prefix' for s in OBJECT_STORE_SCHEMES[:2])}, "
            "or a local or NFS directory that every node mounts at the same path")
    if not rest.split("/", 1)[0].split("?", 1)[0]:
        raise ConfigError(f"storage: {value!r} names no bucket; use "
                          f"{scheme}://bucket/prefix")


def absolute(storage: str) -> str:
    """``storage`` that means the same from any working directory: a local
    directory made absolute; object-store URIs as they are."""
    return storage if is_object_store(storage) else local_path(storage)


def local_path(storage: str, staging: str | None = None) -> str:
    """The local directory a checkpoint store writes for ``storage``: the
    directory itself (``file://`` stripped), or an object store's mirror under
    ``staging``."""
    if is_object_store(storage):
        return staging_path(storage, staging)
    path = storage[len("file://"):] if storage.startswith("file://") else storage
    return os.path.abspath(os.path.expanduser(path))
