"""Exceptions, one small module.

Every error a user can cause subclasses :class:`DistributedError` and a builtin
(so ``except FileNotFoundError`` still works), survives pickling across Ray
actors, and says in its message how to fix the problem. Entry points print
``DistributedError`` messages without a traceback.
"""

from __future__ import annotations


class DistributedError(Exception):
    """Base class for errors whose message is meant for the user."""


class ConfigError(DistributedError, ValueError):
    """A config field has a bad value; the message names the field."""


class SelectionError(ConfigError):
    """A selection spec is invalid or selects nothing."""


class StorageError(DistributedError, OSError):
    """Storage cannot be read or written (permissions, missing path, full disk)."""


class CheckpointNotFoundError(DistributedError, FileNotFoundError):
    """No committed checkpoint matches the request."""


class CheckpointExistsError(DistributedError, FileExistsError):
    """A checkpoint for this run, tier and step is already committed."""


class ManifestError(DistributedError, ValueError):
    """A manifest or catalog file is malformed, hostile or of an unknown version."""


class SchemaVersionError(ManifestError):
    """A table carries a ``schema_version`` this code does not know."""


class CheckpointCorruptError(DistributedError, ValueError):
    """Checkpoint bytes do not match the manifest.

    Attributes:
        path: The file that is bad.
        tensor: The tensor whose bytes are bad, or ``None`` for a file-level fault.
    """

    def __init__(self, message: str, path: str | None = None,
                 tensor: str | None = None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor
