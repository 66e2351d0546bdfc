"""Reads TensorFlow's V2 checkpoint ``.index`` file without TensorFlow's C++ API.

The ``.index`` of a V2 checkpoint is a LevelDB-format table (a "sorted string
table") mapping each tensor name to a ``BundleEntryProto``: dtype, shape, shard
id, byte offset and size inside the ``.data-0000k-of-0000K`` file, and a masked
CRC-32C of those bytes. The empty key holds the ``BundleHeaderProto``.

TensorFlow's Python API exposes names, dtypes and shapes (``CheckpointReader``)
but not offsets or checksums, which the manifest needs; so this module parses the
table directly. TensorFlow writes the table uncompressed; a compressed block is
rejected with a clear error rather than misread.

A partitioned variable (see :mod:`~distributed.checkpoint.slices`) has a
full-tensor entry under its name, with its dtype, full shape and the list of
its slices (``BundleEntryProto.slices``) but no bytes, and one entry per slice
under the key ``checkpoint::EncodeTensorNameSlice(name, slice)``: an
``OrderedCode`` string (a 0 number, the name, the rank, then start and length
of each dimension as signed numbers, length -1 for a whole dimension) whose
entry holds that slice's bytes. :func:`read_index` decodes those keys and
returns one :class:`IndexEntry` per slice under the logical name.

The table's own block checksums leave the 48-byte footer uncovered, so the
manifest also records the CRC-32C of the whole file; :func:`check_index_file`
checks it first when given it.
"""

from __future__ import annotations

import dataclasses
import struct

import crc32c as _crc32c

from distributed.checkpoint.slices import FULL, Extents, format_slice

_FOOTER_SIZE = 48
_TABLE_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes masked crc32c
_MASK_DELTA = 0xA282EAD8


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """One tensor's (or one slice's) entry in a checkpoint ``.index``.

    Attributes:
        name: Checkpoint key (the variable's op name for ``Saver`` checkpoints;
            a partitioned variable's logical name for each of its slices).
        dtype: TensorFlow ``DataType`` enum value.
        shape: Tensor shape (of the whole logical tensor, for a slice).
        shard_id: Which ``.data-<shard_id>-of-<N>`` file holds the bytes.
        offset: Byte offset of the tensor inside that file.
        size: Number of bytes.
        crc32c: Unmasked CRC-32C of the bytes (TensorFlow stores it masked).
        slice: ``(start, length)`` per dimension (``FULL`` length: the whole
            dimension) of a slice; ``None`` for an unsliced tensor.
    """

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int
    slice: Extents | None = None


def mask_crc(crc: int) -> int:
    """LevelDB/TensorFlow CRC masking (so a CRC of data that holds CRCs stays good)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """Inverse of :func:`mask_crc`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The unsigned LEB128 varint at ``buf[pos:]`` and the position after it."""
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
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        value_len, pos = read_varint(block, pos)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise ValueError("corrupt block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len


def read_index(path: str, verify: bool = True) -> list[IndexEntry]:
    """Parses a V2 checkpoint ``.index``: one :class:`IndexEntry` per tensor,
    and one per slice of each partitioned tensor, sorted by name then slice.

    Args:
        path: Path of the ``<prefix>.index`` file.
        verify: Check each table block's checksum.

    Raises:
        ValueError: The file is not a well-formed, uncompressed TF index table,
            or its slice entries disagree with their full-tensor entries.
    """
    from tensorflow.core.protobuf import tensor_bundle_pb2  # heavy import

    with open(path, "rb") as f:
        data = f.read()
    plain: list[IndexEntry] = []
    full: dict[str, object] = {}
    sliced: list[tuple[str, Extents, object]] = []
    for key, value in _table_entries(data, path, verify):
        if not key:  # the BundleHeaderProto
            continue
        proto = tensor_bundle_pb2.BundleEntryProto.FromString(value)
        if key[0] == 0:  # checkpoint::EncodeTensorNameSlice
            name, extents = decode_slice_key(key)
            sliced.append((name, extents, proto))
        elif proto.slices:
            full[key.decode("utf-8")] = proto
        else:
            plain.append(_entry(key.decode("utf-8"), proto))
    entries = plain + _slice_entries(path, full, sliced)
    return sorted(entries, key=lambda e: (e.name, e.slice or ()))


def _table_entries(data: bytes, path: str, verify: bool):
    """Yields the (key, value) pairs of every data block of an index table."""
    if len(data) < _FOOTER_SIZE:
        raise ValueError(f"{path}: too short to be a checkpoint index")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != _TABLE_MAGIC:
        raise ValueError(f"{path}: not a checkpoint index (bad magic)")
    pos = len(data) - _FOOTER_SIZE
    _, pos = read_varint(data, pos)  # metaindex offset
    _, pos = read_varint(data, pos)  # metaindex size
    index_offset, pos = read_varint(data, pos)
    index_size, pos = read_varint(data, pos)
    for _, handle in _block_entries(_read_block(data, index_offset, index_size, verify)):
        block_offset, hpos = read_varint(handle, 0)
        block_size, _ = read_varint(handle, hpos)
        yield from _block_entries(_read_block(data, block_offset, block_size, verify))


def _entry(name: str, proto, shape=None, extents: Extents | None = None) -> IndexEntry:
    return IndexEntry(
        name=name, dtype=int(proto.dtype),
        shape=shape if shape is not None else tuple(int(d.size) for d in proto.shape.dim),
        shard_id=int(proto.shard_id), offset=int(proto.offset), size=int(proto.size),
        crc32c=unmask_crc(proto.crc32c), slice=extents)


def _slice_entries(path: str, full: dict, sliced: list) -> list[IndexEntry]:
    """Pairs each slice entry with its full-tensor entry, which must list
    exactly those slices, in the same dtype, with shapes that agree."""
    listed = {name: {tuple((e.start, e.length if e.HasField("length") else FULL)
                           for e in s.extent) for s in proto.slices}
              for name, proto in full.items()}
    out, seen = [], {name: set() for name in full}
    for name, extents, proto in sliced:
        if name not in full or extents not in listed[name]:
            raise ValueError(f"{path}: slice {format_slice(extents)} of {name!r} is "
                             "not listed in a full-tensor entry")
        shape = tuple(int(d.size) for d in full[name].shape.dim)
        want = tuple(dim if length == FULL else length
                     for (_, length), dim in zip(extents, shape))
        got = tuple(int(d.size) for d in proto.shape.dim)
        if proto.dtype != full[name].dtype or got != want or len(extents) != len(shape):
            raise ValueError(f"{path}: slice {format_slice(extents)} of {name!r} has "
                             f"dtype {proto.dtype} shape {list(got)}, its tensor "
                             f"dtype {full[name].dtype} shape {list(shape)}")
        seen[name].add(extents)
        out.append(_entry(name, proto, shape, extents))
    for name, wanted in listed.items():
        if wanted - seen[name]:
            missing = ", ".join(sorted(format_slice(e) for e in wanted - seen[name]))
            raise ValueError(f"{path}: slice(s) {missing} of {name!r} have no entry")
    return out


# -- OrderedCode (tensorflow/core/lib/strings/ordered_code.cc), decoding only --

_U64 = (1 << 64) - 1
# Header bits that a signed number of each encoded length carries in its payload.
_LENGTH_TO_MASK = (0, 0x80, 0xC000, 0xE00000, 0xF0000000, 0xF800000000,
                   0xFC0000000000, 0xFE000000000000, 0xFF00000000000000,
                   0x8000000000000000, 0)


def decode_slice_key(key: bytes) -> tuple[str, Extents]:
    """``(name, extents)`` of an ``EncodeTensorNameSlice`` key (``FULL`` length
    for a whole dimension).

    Raises:
        ValueError: The key is not such an encoding.
    """
    number, pos = _ordered_unsigned(key, 0)
    if number != 0:
        raise ValueError("not a tensor slice key")
    name, pos = _ordered_string(key, pos)
    rank, pos = _ordered_unsigned(key, pos)
    if rank > 64:
        raise ValueError(f"slice key of rank {rank}")
    extents = []
    for _ in range(rank):
        start, pos = _ordered_signed(key, pos)
        length, pos = _ordered_signed(key, pos)
        if start < 0 or length < FULL:
            raise ValueError(f"slice key with extent ({start}, {length})")
        extents.append((start, length))
    if pos != len(key):
        raise ValueError("trailing bytes after a tensor slice key")
    return name.decode("utf-8"), tuple(extents)


def _ordered_unsigned(buf: bytes, pos: int) -> tuple[int, int]:
    """``WriteNumIncreasing``: a length byte, then that many big-endian bytes."""
    if pos >= len(buf) or buf[pos] > 8 or pos + 1 + buf[pos] > len(buf):
        raise ValueError("truncated number in a slice key")
    n = buf[pos]
    return int.from_bytes(buf[pos + 1:pos + 1 + n], "big"), pos + 1 + n


def _ordered_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    """``WriteString``: bytes with 0x00 -> 00 ff and 0xff -> ff 00, ended by 00 01."""
    out = bytearray()
    while pos + 1 < len(buf):
        c, nxt = buf[pos], buf[pos + 1]
        if c == 0x00 and nxt == 0x01:
            return bytes(out), pos + 2
        if c in (0x00, 0xFF):
            if (c, nxt) not in ((0x00, 0xFF), (0xFF, 0x00)):
                raise ValueError("bad escape in a slice key")
            out.append(c)
            pos += 2
        else:
            out.append(c)
            pos += 1
    raise ValueError("unterminated name in a slice key")


def _ordered_signed(buf: bytes, pos: int) -> tuple[int, int]:
    """``WriteSignedNumIncreasing``: sign bit, unary length bits, payload."""
    if pos >= len(buf):
        raise ValueError("truncated number in a slice key")
    xor = 0 if buf[pos] & 0x80 else _U64
    first = buf[pos] ^ (xor & 0xFF)
    if first != 0xFF:
        length = 8 - (first ^ 0xFF).bit_length()
        if pos + length > len(buf):
            raise ValueError("truncated number in a slice key")
        x = xor
        for b in buf[pos:pos + length]:
            x = ((x << 8) | b) & _U64
    else:
        length = 8
        second = buf[pos + 1] ^ (xor & 0xFF) if pos + 1 < len(buf) else 0
        if second >= 0x80:
            third = buf[pos + 2] ^ (xor & 0xFF) if pos + 2 < len(buf) else 0xFF
            if second < 0xC0:
                length = 9
            elif second == 0xC0 and third < 0x80:
                length = 10
            else:
                raise ValueError("number too long in a slice key")
        if pos + length > len(buf):
            raise ValueError("truncated number in a slice key")
        x = int.from_bytes(buf[pos + length - 8:pos + length], "big")
    x ^= _LENGTH_TO_MASK[length]
    return (x - (1 << 64) if x >> 63 else x), pos + length


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
    meta_offset, pos = read_varint(data, pos)
    meta_size, pos = read_varint(data, pos)
    index_offset, pos = read_varint(data, pos)
    index_size, pos = read_varint(data, pos)
    _read_block(data, meta_offset, meta_size, verify=True)
    index_block = _read_block(data, index_offset, index_size, verify=True)
    count = 0
    for _, handle in _block_entries(index_block):
        block_offset, hpos = read_varint(handle, 0)
        block_size, _ = read_varint(handle, hpos)
        _read_block(data, block_offset, block_size, verify=True)
        count += 1
    return count
