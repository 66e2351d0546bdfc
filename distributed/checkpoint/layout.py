"""Where things live under ``<storage>/<run>/`` and the durable-write primitives.

Layout::

    <storage>/<run>/checkpoints/<tier>/step-000000100/   model.ckpt.index,
                                                          model.ckpt.data-*-of-*,
                                                          manifest.parquet
    <storage>/<run>/checkpoints/<tier>/step-000000100.tmp-<random>/   (in flight)
    <storage>/<run>/catalog/step-000000100.<tier>.<crc>.parquet   (the commit record)
    <storage>/<run>/quarantine/<tier>-step-000000100-<time>/   (failed verification;
                                                          kept for inspection)

Names are zero-padded so they sort by step. Every name pattern of the commit
protocol is a constant here and nowhere else.

``<crc>`` is the CRC-32C of the row file's own bytes (8 lowercase hex digits).
A checksum inside a file cannot cover the whole file; one in its name, which
lives in the directory, covers every byte, and Parquet readers still read
``catalog/*.parquet`` unchanged. See :mod:`distributed.checkpoint.catalog` for
the rest of the checksum chain.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets

import crc32c as _crc32c

TIERS = ("serving", "full")
CHECKPOINTS_DIR = "checkpoints"
CATALOG_DIR = "catalog"
CKPT_PREFIX = "model.ckpt"
MANIFEST_FILE = "manifest.parquet"
QUARANTINE_DIR = "quarantine"
QUARANTINE_REASON_FILE = "REASON.txt"
TMP_MARKER = ".tmp-"
STEP_DIGITS = 9
# Beside the checkpoints in a run's directory: the config the run was started
# with (the restore job rebuilds the model from it) and its TensorBoard events.
RUN_CONFIG_FILE = "run_config.json"
TENSORBOARD_DIR = "tensorboard"

_STEP_DIR_RE = re.compile(r"^step-(\d{%d})$" % STEP_DIGITS)
_CATALOG_ROW_RE = re.compile(
    r"^step-(\d{%d})\.([a-z]+)(?:\.([0-9a-f]{8}))?\.parquet$" % STEP_DIGITS)
_RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_name(run: str) -> str:
    """Returns ``run`` or raises ``ValueError`` if it is not a safe directory name."""
    if not isinstance(run, str) or not _RUN_RE.match(run) or ".." in run:
        raise ValueError(
            f"run name {run!r} is not valid: use 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit")
    return run


def check_tier(tier: str) -> str:
    """Returns ``tier`` or raises ``ValueError`` naming the valid tiers."""
    if tier not in TIERS:
        raise ValueError(f"tier {tier!r} is not valid: use one of {TIERS}")
    return tier


def step_dirname(step: int) -> str:
    """``step-000000100``."""
    if not isinstance(step, int) or step < 0 or step >= 10**STEP_DIGITS:
        raise ValueError(f"step {step!r} must be an integer in [0, {10**STEP_DIGITS})")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> int | None:
    """Inverse of :func:`step_dirname`; ``None`` for any other name."""
    m = _STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def tmp_dirname(step: int) -> str:
    """A fresh in-flight directory name; never visible to readers."""
    return f"{step_dirname(step)}{TMP_MARKER}{secrets.token_hex(4)}"


def is_tmp_name(name: str) -> bool:
    """True for anything the commit protocol writes before its final rename."""
    return TMP_MARKER in name


def crc32c_hex(crc: int) -> str:
    """The 8-hex-digit spelling of a CRC-32C used in file names."""
    return f"{crc:08x}"


def bytes_crc32c(data) -> int:
    """CRC-32C of a bytes-like object (hardware-accelerated where available)."""
    return _crc32c.crc32c(data)


def file_crc32c(path: str, chunk: int = 16 << 20) -> int:
    """CRC-32C of a whole file's bytes, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = _crc32c.crc32c(block, crc)
    return crc


def catalog_row_name(step: int, tier: str, crc: int) -> str:
    """``step-000000100.serving.1a2b3c4d.parquet``: the commit record of one
    checkpoint; ``crc`` is the CRC-32C of the file's bytes."""
    return f"{step_dirname(step)}.{check_tier(tier)}.{crc32c_hex(crc)}.parquet"


def parse_catalog_row_name(name: str) -> tuple[int, str, int | None] | None:
    """Inverse of :func:`catalog_row_name`: ``(step, tier, crc)``; ``None`` for
    any other name.

    ``crc`` is ``None`` for a version-1 row name (``step-N.<tier>.parquet``, no
    checksum). Such a name still counts as committed, so an upgrade never
    mistakes old checkpoints for orphans and deletes them; readers reject it.
    """
    m = _CATALOG_ROW_RE.match(name)
    if not m or m.group(2) not in TIERS:
        return None
    crc = m.group(3)
    return int(m.group(1)), m.group(2), None if crc is None else int(crc, 16)


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Paths of one run under a storage root."""

    storage: str
    run: str

    def __post_init__(self):
        check_run_name(self.run)

    @property
    def root(self) -> str:
        return os.path.join(self.storage, self.run)

    @property
    def catalog_dir(self) -> str:
        return os.path.join(self.root, CATALOG_DIR)

    def tier_dir(self, tier: str) -> str:
        return os.path.join(self.root, CHECKPOINTS_DIR, check_tier(tier))

    def checkpoint_dir(self, tier: str, step: int) -> str:
        return os.path.join(self.tier_dir(tier), step_dirname(step))

    @property
    def quarantine_dir(self) -> str:
        return os.path.join(self.root, QUARANTINE_DIR)

    def relative_checkpoint_path(self, tier: str, step: int) -> str:
        """The ``path`` recorded in the catalog: relative to the run root."""
        return "/".join((CHECKPOINTS_DIR, check_tier(tier), step_dirname(step)))


def fsync_file(path: str) -> None:
    """Flushes one file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Makes renames and creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsyncs every file below ``path``, then each directory (deepest first)."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``path`` via a tmp name, fsync, rename and a directory fsync.

    A reader sees either no file or the whole file; a crash leaves at most a
    ``*.tmp-*`` file that cleanup removes.
    """
    directory = os.path.dirname(path) or "."
    tmp = f"{path}{TMP_MARKER}{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
