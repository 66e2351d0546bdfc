"""Exceptions, one small module.

Every error a user can cause subclasses :class:`DistributedError` and a builtin
(so ``except FileNotFoundError`` still works), survives pickling across Ray
actors, and says in its message how to fix the problem. Entry points print
``DistributedError`` messages without a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import traceback


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


class SliceLayoutError(ManifestError):
    """A checkpoint's slices of a partitioned variable do not tile it exactly
    (a slice is missing, overlaps another or lies outside the variable)."""


class PartitionMismatchError(DistributedError, ValueError):
    """Two graphs of one run partition a variable differently (other part
    names or shapes), so values cannot be handed over part by part."""


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


class UserCodeError(DistributedError, RuntimeError):
    """The user's model or input function raised; the message carries its traceback."""


class StepError(DistributedError, RuntimeError):
    """An op of the user's graph failed at step time (TF's message, the op and
    the user's lines that made it are in the message). Not retried: a restart
    would fail the same way.

    Attributes:
        op: The failing op's name, or ``None`` if unknown.
        kind: TF's error class name (``InvalidArgumentError``, ...).
        tf_message: TF's own one-line message.
    """

    def __init__(self, message: str, op: str | None = None, kind: str = "",
                 tf_message: str = ""):
        super().__init__(message)
        self.op, self.kind, self.tf_message = op, kind, tf_message

    def __reduce__(self):
        return (type(self), (str(self), self.op, self.kind, self.tf_message))


class LossDivergedError(DistributedError, FloatingPointError):
    """The training loss became NaN or infinite; committed checkpoints are kept."""


class TrainingFailedError(DistributedError, RuntimeError):
    """The worker group failed more often than ``max_failures`` allows."""


def last_line(e: BaseException) -> str:
    """The last non-blank line of an exception's message (where Ray and TF put
    the actual error), or its type name when the message is empty."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


@contextlib.contextmanager
def user_code(field: str, ref: str):
    """Runs the user's ``field`` function ``ref``; turns what it raises into
    :class:`UserCodeError` with the user's part of the traceback, once.

    Our own frames are dropped so the message starts at the user's code; our
    :class:`DistributedError`\ s pass through unchanged.
    """
    try:
        yield
    except DistributedError:
        raise
    except Exception as e:
        # Drop this generator's frame and the caller's (the ``with`` body).
        frames = traceback.extract_tb(e.__traceback__)[2:]
        detail = "".join(traceback.format_list(frames))
        raise UserCodeError(
            f"{field}: {ref} raised {type(e).__name__}: {e}\n"
            f"Traceback of {ref} (most recent call last):\n{detail}"
            f"{''.join(traceback.format_exception_only(e)).rstrip()}\n"
            f"Fix {ref} (the {field!r} entry of the config) and re-run.") from None


def did_you_mean(name: object, valid) -> str:
    """``"did you mean 'x'? "`` for the valid name closest to a wrong one, or
    ``""`` when none is close: the hint every "unknown name" error carries."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f"did you mean {close[0]!r}? " if close else ""
