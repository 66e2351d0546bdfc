"""Reads TensorFlow's V2 checkpoint ``.index`` file without TensorFlow's C++ API.

The ``.index`` of a V2 checkpoint is a LevelDB-format table (a "sorted string
table") mapping each tensor name to a ``BundleEntryProto``: dtype, shape, shard
id, byte offset and size inside the ``.data-0000k-of-0000K`` file, and a masked
CRC-32C of those bytes. The empty key holds the ``BundleHeaderProto``.

TensorFlow's Python API exposes names, dtypes and shapes (``CheckpointReader``)
but not offsets or checksums, which the manifest needs; so this module parses the
table directly. TensorFlow writes the table uncompressed; a compressed block is
rejected with a clear error rather than misread.

The table's own block checksums leave the 48-byte footer uncovered, so the
manifest also records the CRC-32C of the whole file; :func:`check_index_file`
checks it first when given it.
"""

from __future__ import annotations

import dataclasses
import struct

import crc32c as _crc32c

_FOOTER_SIZE = 48
_TABLE_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes masked crc32c
_MASK_DELTA = 0xA282EAD8


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """One tensor's entry in a checkpoint ``.index``.

    Attributes:
        name: Checkpoint key (the variable's op name for ``Saver`` checkpoints).
        dtype: TensorFlow ``DataType`` enum value.
        shape: Tensor shape.
        shard_id: Which ``.data-<shard_id>-of-<N>`` file holds the bytes.
        offset: Byte offset of the tensor inside that file.
        size: Number of bytes.
        crc32c: Unmasked CRC-32C of the bytes (TensorFlow stores it masked).
    """

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int


def mask_crc(crc: int) -> int:
    """LevelDB/TensorFlow CRC masking (so a CRC of data that holds CRCs stays good)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """Inverse of :func:`mask_crc`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _read_block(data: bytes, offset: int, size: int, verify: bool) -> bytes:
    end = offset + size
    if offset < 0 or end + _BLOCK_TRAILER_SIZE > len(data):
        raise ValueError(f"block [{offset}, {end}) lies outside the file")
    block = data[offset:end]
    ctype = data[end]
    if ctype != 0:
        raise ValueError(f"compressed index blocks (type {ctype}) are not supported")
    if verify:
        (stored,) = struct.unpack_from("<I", data, end + 1)
        actual = _crc32c.crc32c(data[offset:end + 1])
        if unmask_crc(stored) != actual:
            raise ValueError(f"block at offset {offset} fails its checksum")
    return block


def _block_entries(block: bytes):
    """Yields (key, value) pairs of one table block (prefix-compressed keys)."""
    if len(block) < 4:
        raise ValueError("block too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise ValueError("bad restart count")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise ValueError("corrupt block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len


def read_index(path: str, verify: bool = True) -> dict[str, IndexEntry]:
    """Parses a V2 checkpoint ``.index`` into ``{tensor name: IndexEntry}``.

    Args:
        path: Path of the ``<prefix>.index`` file.
        verify: Check each table block's checksum.

    Raises:
        ValueError: The file is not a well-formed, uncompressed TF index table,
            or holds partitioned (sliced) tensors, which this project never writes.
    """
    from tensorflow.core.protobuf import tensor_bundle_pb2  # heavy import

    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _FOOTER_SIZE:
        raise ValueError(f"{path}: too short to be a checkpoint index")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != _TABLE_MAGIC:
        raise ValueError(f"{path}: not a checkpoint index (bad magic)")
    pos = len(data) - _FOOTER_SIZE
    _, pos = _varint(data, pos)  # metaindex offset
    _, pos = _varint(data, pos)  # metaindex size
    index_offset, pos = _varint(data, pos)
    index_size, pos = _varint(data, pos)

    entries: dict[str, IndexEntry] = {}
    index_block = _read_block(data, index_offset, index_size, verify)
    for _, handle in _block_entries(index_block):
        block_offset, hpos = _varint(handle, 0)
        block_size, _ = _varint(handle, hpos)
        for key, value in _block_entries(
                _read_block(data, block_offset, block_size, verify)):
            if not key:  # the BundleHeaderProto
                continue
            proto = tensor_bundle_pb2.BundleEntryProto.FromString(value)
            name = key.decode("utf-8")
            if proto.slices:
                raise ValueError(f"{path}: tensor {name!r} is partitioned")
            entries[name] = IndexEntry(
                name=name,
                dtype=int(proto.dtype),
                shape=tuple(int(d.size) for d in proto.shape.dim),
                shard_id=int(proto.shard_id),
                offset=int(proto.offset),
                size=int(proto.size),
                crc32c=unmask_crc(proto.crc32c),
            )
    return entries


def check_index_file(path: str, expected_crc32c: int | None = None) -> int:
    """Checks a ``.index`` file's footer and every block checksum, without TF.

    Args:
        path: The ``.index`` file.
        expected_crc32c: CRC-32C of the whole file (from the manifest); when
            given, any changed byte, footer included, is caught.

    Returns:
        The number of data blocks checked.

    Raises:
        ValueError: Naming what is wrong (a whole-file CRC mismatch, bad magic,
            a block outside the file, a block checksum mismatch).
    """
    with open(path, "rb") as f:
        data = f.read()
    if expected_crc32c is not None:
        actual = _crc32c.crc32c(data)
        if actual != expected_crc32c:
            raise ValueError(
                f"the CRC-32C of the whole file is {actual:#010x} but the manifest "
                f"records {expected_crc32c:#010x}")
    if len(data) < _FOOTER_SIZE:
        raise ValueError("too short to be a checkpoint index")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != _TABLE_MAGIC:
        raise ValueError("bad magic number in the footer")
    pos = len(data) - _FOOTER_SIZE
    meta_offset, pos = _varint(data, pos)
    meta_size, pos = _varint(data, pos)
    index_offset, pos = _varint(data, pos)
    index_size, pos = _varint(data, pos)
    _read_block(data, meta_offset, meta_size, verify=True)
    index_block = _read_block(data, index_offset, index_size, verify=True)
    count = 0
    for _, handle in _block_entries(index_block):
        block_offset, hpos = _varint(handle, 0)
        block_size, _ = _varint(handle, hpos)
        _read_block(data, block_offset, block_size, verify=True)
        count += 1
    return count
