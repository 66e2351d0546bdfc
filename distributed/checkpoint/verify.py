"""Checks a checkpoint's bytes against its manifest, without TensorFlow.

Every tensor's bytes are read from its shard (memory-mapped, shards in
parallel threads) and checked for length, dtype/shape consistency and CRC-32C
(computed in C by the ``crc32c`` package, hardware-accelerated where the CPU has
it). The ``.index`` file's block checksums are checked too, since that is what
TensorFlow reads when it restores.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import mmap
import os
import time

import crc32c as _crc32c

from distributed.checkpoint.layout import CKPT_PREFIX
from distributed.checkpoint.manifest import Manifest, read_manifest, safe_shard_path
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


def _check_shard(path: str, rows) -> list[Problem]:
    problems = []
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        return [Problem(path, None, f"cannot read shard ({e.strerror or e})")]
    try:
        view = memoryview(mm) if mm is not None else memoryview(b"")
        for r in rows:
            if r.offset + r.length > size:
                problems.append(Problem(
                    path, r.name, f"bytes [{r.offset}, {r.offset + r.length}) run "
                    f"past the end of the file ({size} bytes)"))
                continue
            actual = _crc32c.crc32c(view[r.offset:r.offset + r.length])
            if actual != r.crc32c:
                problems.append(Problem(
                    path, r.name, f"CRC-32C mismatch (manifest {r.crc32c:#010x}, "
                    f"file {actual:#010x}): the bytes are corrupt"))
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
    index_path = os.path.join(checkpoint_dir, CKPT_PREFIX + ".index")
    try:
        check_index_file(index_path)
    except FileNotFoundError:
        problems.append(Problem(index_path, None, "index file is missing"))
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
                        num_tensors=len(manifest.tensors),
                        num_bytes=manifest.num_bytes,
                        seconds=time.perf_counter() - start,
                        problems=tuple(problems))


def verify_checkpoint(checkpoint_dir: str, raise_on_error: bool = True) -> VerifyReport:
    """Verifies every tensor of a checkpoint directory against its manifest.

    Args:
        checkpoint_dir: A committed checkpoint directory.
        raise_on_error: Raise on the first problem instead of returning them.

    Raises:
        CheckpointCorruptError: (with ``raise_on_error``) naming the tensor and
            file that are bad; ``ManifestError`` if the manifest itself is bad.
    """
    try:
        manifest = read_manifest(checkpoint_dir)
    except ManifestError as e:
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
    wanted tensors are read straight into fresh numpy arrays.

    Args:
        checkpoint_dir: The checkpoint directory.
        manifest: Its validated manifest.
        names: Tensor names to return.
        numpy_dtype: Maps a manifest dtype name to a numpy dtype.

    Raises:
        CheckpointCorruptError: Naming the first bad tensor and file.
    """
    wanted = set(names)
    index_path = os.path.join(checkpoint_dir, CKPT_PREFIX + ".index")
    try:
        check_index_file(index_path)
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(
            f"checkpoint {checkpoint_dir} is corrupt: {index_path}: {e}",
            path=index_path) from None
    by_shard: dict[str, list] = {}
    for r in manifest.tensors:
        by_shard.setdefault(r.shard, []).append(r)

    def read_shard(shard: str) -> dict:
        path = safe_shard_path(checkpoint_dir, shard, checkpoint_dir)
        out = {}
        scratch = bytearray(_CHUNK)
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            raise CheckpointCorruptError(
                f"checkpoint {checkpoint_dir} is corrupt: {path}: cannot read shard "
                f"({e.strerror or e})", path=path) from None
        with f:
            for r in sorted(by_shard[shard], key=lambda r: r.offset):
                f.seek(r.offset)
                if r.name in wanted:
                    arr = _aligned_empty(r.shape, numpy_dtype(r.dtype))
                    view = memoryview(arr.reshape(-1)).cast("B")
                    out[r.name] = arr
                else:
                    view = None
                crc, got = 0, 0
                while got < r.length:
                    n = min(r.length - got, _CHUNK)
                    dest = (view[got:got + n] if view is not None
                            else memoryview(scratch)[:n])
                    n = f.readinto(dest)
                    if not n:
                        break
                    crc = _crc32c.crc32c(dest[:n], crc)
                    got += n
                if got != r.length:
                    raise CheckpointCorruptError(
                        f"checkpoint {checkpoint_dir} is corrupt: tensor {r.name!r} in "
                        f"{path}: bytes run past the end of the file", path=path,
                        tensor=r.name)
                if crc != r.crc32c:
                    raise CheckpointCorruptError(
                        f"checkpoint {checkpoint_dir} is corrupt: tensor {r.name!r} in "
                        f"{path}: CRC-32C mismatch (manifest {r.crc32c:#010x}, file "
                        f"{crc:#010x})", path=path, tensor=r.name)
        return out

    result: dict = {}
    workers = max_workers or min(len(by_shard), os.cpu_count() or 1) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for part in pool.map(read_shard, sorted(by_shard)):
            result.update(part)
    missing = wanted - set(result)
    if missing:
        raise KeyError(f"not in the checkpoint: {sorted(missing)}")
    return result
