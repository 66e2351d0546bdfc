"""Checks a checkpoint's bytes against its manifest, without TensorFlow.

Every tensor's bytes are read from its shard (memory-mapped, shards in
parallel threads) and checked for length, dtype/shape consistency and CRC-32C
(computed in C by the ``crc32c`` package, hardware-accelerated where the CPU has
it). The ``.index`` file is checked whole against the CRC-32C the manifest
records, and block by block, since that is what TensorFlow reads when it restores.

Together with the catalog this is a checksum chain with no gap: the row file's
name holds the CRC of its bytes, the row the manifest's, the manifest the
index's and every tensor's (every slice's, for a partitioned variable), and
the tensors tile their shard files. The manifest reader has already checked
that each partitioned variable's slices tile it, so :func:`read_verified`
assembles whole tensors with no element missing or written twice. So one
flipped byte in any of these files is always found, and the error names the
file. Checksum mismatches raise :class:`CheckpointCorruptError`; structurally
impossible or hostile manifests raise :class:`ManifestError`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import mmap
import os
import threading
import time

import crc32c as _crc32c

from distributed.checkpoint import slices
from distributed.checkpoint.catalog import Catalog
from distributed.checkpoint.layout import CKPT_PREFIX, RunLayout
from distributed.checkpoint.manifest import (Manifest, read_manifest, safe_member_path,
                                             safe_shard_path)
from distributed.checkpoint.tf_index import check_index_file
from distributed.errors import CheckpointCorruptError, ManifestError


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: which file, which tensor, what."""

    path: str
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = f"tensor {self.tensor!r} in {self.path}" if self.tensor else self.path
        return f"{where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_checkpoint`."""

    checkpoint_dir: str
    num_tensors: int
    num_bytes: int
    seconds: float
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _untiled(rows, size: int) -> str | None:
    """Says which bytes of a shard no tensor covers, or ``None`` if the tensors
    (sorted by offset) tile ``[0, size)``: TensorFlow writes no gaps, so a gap
    means the manifest and the file disagree and its bytes would go unchecked."""
    pos = 0
    for r in rows:
        if r.offset > pos:
            return f"bytes [{pos}, {r.offset}) are not covered by any tensor"
        pos = max(pos, r.offset + r.length)
    if pos < size:
        return f"bytes [{pos}, {size}) after the last tensor are not in the manifest"
    return None


def _check_shard(path: str, rows) -> list[Problem]:
    problems = []
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        return [Problem(path, None, f"cannot read shard ({e.strerror or e})")]
    rows = sorted(rows, key=lambda r: r.offset)
    gap = _untiled(rows, size)
    if gap:
        problems.append(Problem(path, None, gap))
    try:
        view = memoryview(mm) if mm is not None else memoryview(b"")
        for r in rows:
            part = f"slice {r.slice}: " if r.slice else ""
            if r.offset + r.length > size:
                problems.append(Problem(
                    path, r.name, f"{part}bytes [{r.offset}, {r.offset + r.length}) "
                    f"run past the end of the file ({size} bytes)"))
                continue
            actual = _crc32c.crc32c(view[r.offset:r.offset + r.length])
            if actual != r.crc32c:
                problems.append(Problem(
                    path, r.name, f"{part}CRC-32C mismatch (manifest "
                    f"{r.crc32c:#010x}, file {actual:#010x}): the bytes are corrupt"))
        view.release()
    finally:
        if mm is not None:
            mm.close()
    return problems


def verify_manifest(checkpoint_dir: str, manifest: Manifest,
                    max_workers: int | None = None) -> VerifyReport:
    """Verifies the files of ``checkpoint_dir`` against an already-read manifest."""
    start = time.perf_counter()
    problems: list[Problem] = []
    index_path = _index_path(checkpoint_dir)
    try:
        check_index_file(index_path, manifest.index_crc32c)
    except FileNotFoundError:
        problems.append(Problem(index_path, None, "index file is missing"))
    except OSError as e:
        problems.append(Problem(index_path, None,
                                f"cannot read index file ({e.strerror or e})"))
    except ValueError as e:
        problems.append(Problem(index_path, None, f"index file is corrupt: {e}"))
    by_shard: dict[str, list] = {}
    for r in manifest.tensors:
        by_shard.setdefault(r.shard, []).append(r)
    paths = {s: safe_shard_path(checkpoint_dir, s, checkpoint_dir) for s in by_shard}
    workers = max_workers or min(len(by_shard), os.cpu_count() or 1) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for found in pool.map(lambda s: _check_shard(paths[s], by_shard[s]),
                              sorted(by_shard)):
            problems.extend(found)
    return VerifyReport(checkpoint_dir=checkpoint_dir,
                        num_tensors=manifest.num_tensors,
                        num_bytes=manifest.num_bytes,
                        seconds=time.perf_counter() - start,
                        problems=tuple(problems))


def _index_path(checkpoint_dir: str) -> str:
    """The checkpoint's ``.index``, refusing a symlink out of the directory."""
    name = CKPT_PREFIX + ".index"
    return safe_member_path(checkpoint_dir, name,
                            f"{os.path.join(checkpoint_dir, name)}: index file")


def verify_checkpoint(checkpoint_dir: str, raise_on_error: bool = True,
                      manifest_crc32c: int | None = None) -> VerifyReport:
    """Verifies every tensor of a checkpoint directory against its manifest.

    Args:
        checkpoint_dir: A committed checkpoint directory.
        raise_on_error: Raise on the first problem instead of returning them.
        manifest_crc32c: The CRC-32C the catalog row records for
            ``manifest.parquet``. Pass it (``CheckpointStore.verify`` does) so a
            flip anywhere in the manifest is caught; without it the manifest is
            only checked for structure and by its Parquet page checksums.

    Raises:
        CheckpointCorruptError: (with ``raise_on_error``) naming the tensor and
            file that are bad; ``ManifestError`` if the manifest itself is bad.
    """
    try:
        manifest = read_manifest(checkpoint_dir, manifest_crc32c)
    except (CheckpointCorruptError, ManifestError) as e:
        if raise_on_error:
            raise
        return VerifyReport(checkpoint_dir, 0, 0, 0.0,
                            (Problem(os.path.join(checkpoint_dir, "manifest.parquet"),
                                     None, str(e)),))
    report = verify_manifest(checkpoint_dir, manifest)
    if raise_on_error and report.problems:
        first = report.problems[0]
        more = (f" (and {len(report.problems) - 1} more problem(s))"
                if len(report.problems) > 1 else "")
        raise CheckpointCorruptError(f"checkpoint {checkpoint_dir} is corrupt: "
                                     f"{first}{more}", path=first.path,
                                     tensor=first.tensor)
    return report


def read_committed_manifest(run_layout: RunLayout, step: int,
                            tier: str) -> tuple[str, Manifest]:
    """A committed checkpoint's directory and manifest, read down the checksum
    chain: the row file itself (its CRC is in its name; a listing may have come
    from the compacted copy), then the manifest against the CRC the row records.

    Raises:
        CheckpointNotFoundError: Not committed (any more).
        CheckpointCorruptError: The row file or the manifest fails its CRC.
        ManifestError: Either is damaged, hostile or of an unknown version.
    """
    entry = Catalog(run_layout).get(step, tier)
    checkpoint_dir = run_layout.checkpoint_dir(tier, step)
    return checkpoint_dir, read_manifest(checkpoint_dir, entry.manifest_crc32c)


_CHUNK = 16 << 20


def _aligned_empty(shape, dtype, alignment: int = 64):
    """An uninitialized array whose data is ``alignment``-byte aligned, so
    TensorFlow can take it as a feed without copying it."""
    import numpy as np
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_verified(checkpoint_dir: str, manifest: Manifest, names,
                  numpy_dtype, max_workers: int | None = None) -> dict:
    """Reads and verifies a checkpoint in one pass; returns the wanted tensors.

    Every tensor's bytes are CRC-checked (not only the wanted ones), so this is
    :func:`verify_manifest` and loading at the cost of a single read: the
    wanted tensors are read straight into fresh numpy arrays. A partitioned
    variable comes back whole: each slice is read into its block of the
    array (in place when the block is contiguous, as partitioners make it).

    Args:
        checkpoint_dir: The checkpoint directory.
        manifest: Its validated manifest.
        names: (Logical) tensor names to return.
        numpy_dtype: Maps a manifest dtype name to a numpy dtype.

    Raises:
        CheckpointCorruptError: Naming the first bad file (and tensor), before
            allocating anything for a tensor that runs past its file's end.
        ManifestError: The index or a shard is a symlink out of the directory.
        KeyError: A wanted name is not in the checkpoint.
    """
    wanted = set(names)
    missing = wanted - {r.name for r in manifest.tensors}
    if missing:
        raise KeyError(f"not in the checkpoint: {sorted(missing)}")
    index_path = _index_path(checkpoint_dir)
    try:
        check_index_file(index_path, manifest.index_crc32c)
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(
            f"checkpoint {checkpoint_dir} is corrupt: {index_path}: {e}",
            path=index_path) from None
    by_shard: dict[str, list] = {}
    for r in manifest.tensors:
        by_shard.setdefault(r.shard, []).append(r)
    out: dict = {}
    lock = threading.Lock()

    def array_for(row):
        """The array a wanted tensor is read into, made once, on first use
        (after its shard passed the size checks)."""
        with lock:
            if row.name not in out:
                out[row.name] = _aligned_empty(row.shape, numpy_dtype(row.dtype))
            return out[row.name]

    def read_shard(shard: str) -> None:
        path = safe_shard_path(checkpoint_dir, shard, checkpoint_dir)
        _read_shard(checkpoint_dir, path, by_shard[shard], wanted, array_for)

    workers = max_workers or min(len(by_shard), os.cpu_count() or 1) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(read_shard, sorted(by_shard)))
    return out


def _corrupt(checkpoint_dir: str, path: str, what: str, tensor=None):
    return CheckpointCorruptError(f"checkpoint {checkpoint_dir} is corrupt: {what}",
                                  path=path, tensor=tensor)


def _read_shard(checkpoint_dir: str, path: str, rows, wanted: set, array_for) -> None:
    """Reads and CRC-checks every row of one shard, filling the wanted arrays."""
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise _corrupt(checkpoint_dir, path, f"{path}: cannot read shard "
                       f"({e.strerror or e})") from None
    scratch = bytearray(_CHUNK)
    with f:
        rows = sorted(rows, key=lambda r: r.offset)
        size = os.fstat(f.fileno()).st_size
        for r in rows:  # before allocating anything the manifest asks for
            if r.offset + r.length > size:
                raise _corrupt(checkpoint_dir, path, f"tensor {r.label} in {path}: "
                               f"bytes [{r.offset}, {r.offset + r.length}) run past "
                               f"the end of the file ({size} bytes)", r.name)
        gap = _untiled(rows, size)
        if gap:
            raise _corrupt(checkpoint_dir, path, f"{path}: {gap}")
        for r in rows:
            f.seek(r.offset)
            view, finish = (_destination(array_for(r), r) if r.name in wanted
                            else (None, None))
            crc, got = _read_into(f, r.length, view, scratch)
            if got != r.length:
                raise _corrupt(checkpoint_dir, path, f"tensor {r.label} in {path}: "
                               "bytes run past the end of the file", r.name)
            if crc != r.crc32c:
                raise _corrupt(checkpoint_dir, path, f"tensor {r.label} in {path}: "
                               f"CRC-32C mismatch (manifest {r.crc32c:#010x}, file "
                               f"{crc:#010x})", r.name)
            if finish is not None:
                finish()


def _destination(array, row):
    """``(bytes view to read into, callback after the read or None)``: the
    row's block of ``array`` itself when contiguous, else a buffer copied into
    the block afterwards."""
    import numpy as np
    extents = row.extents
    offset = slices.contiguous_offset(array.shape, extents)
    flat = memoryview(array.reshape(-1)).cast("B")
    if offset is not None:
        start = offset * array.itemsize
        return flat[start:start + row.length], None
    buffer = np.empty(row.length, np.uint8)

    def finish():
        block = buffer.view(array.dtype).reshape(slices.slice_shape(extents))
        array[slices.region(extents)] = block
    return memoryview(buffer), finish


def _read_into(f, length: int, view, scratch: bytearray) -> tuple[int, int]:
    """Reads ``length`` bytes into ``view`` (or through ``scratch`` when
    ``None``); returns ``(crc32c, bytes read)``."""
    crc, got = 0, 0
    while got < length:
        n = min(length - got, _CHUNK)
        dest = view[got:got + n] if view is not None else memoryview(scratch)[:n]
        n = f.readinto(dest)
        if not n:
            break
        crc = _crc32c.crc32c(dest[:n], crc)
        got += n
    return crc, got
