"""Slices of partitioned variables: TensorFlow's slice syntax, checked. No TF.

A variable made with a partitioner (``get_variable(..., partitioner=
fixed_size_partitioner(n))``) is ``n`` variables (``emb/part_0`` ...), each a
block of one logical tensor (``emb``). TensorFlow's ``Saver`` writes it as that
one logical tensor in slices: each part's bytes under the logical name, with
its start and length per dimension, so any ``Saver`` restores it into any
partitioning, or none. This project writes them the same way (see
:mod:`~distributed.checkpoint.writer`), and its manifest has a row per slice.

A slice is written in TensorFlow's own syntax, the part of
``Variable.SaveSliceInfo.spec`` after the full shape: ``start,length`` per
dimension joined by ``:``, with ``-`` for a whole dimension (``0,525000:0,64``
or ``0,525000:-``). Slices come from storage, so :func:`parse_slice` trusts
nothing: a slice must have the variable's rank and lie inside its shape, and
:func:`uncovered` says what is wrong when the slices of a variable do not tile
it exactly (a gap or an overlap), naming the indices.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

# (start, length) per dimension; ``FULL`` as a length means the whole dimension
# (TensorFlow's kFullExtent), before :func:`resolve` replaces it.
Extents = tuple[tuple[int, int], ...]
FULL = -1

_EXTENT_RE = re.compile(r"^(?:-|(\d{1,18}),(\d{1,18}))$")
# Slices cut along more than one dimension are checked pairwise; past this many
# (no partitioner makes such layouts) a manifest is refused rather than stall.
MAX_BLOCK_SLICES = 4096


def format_slice(extents: Extents) -> str:
    """TensorFlow's slice syntax for ``extents`` (``-`` for a ``FULL`` length)."""
    return ":".join("-" if length == FULL else f"{start},{length}"
                    for start, length in extents)


def parse_slice(text: str, shape: Sequence[int]) -> Extents:
    """Parses a slice of a tensor of ``shape`` into resolved extents.

    Raises:
        ValueError: Not TensorFlow slice syntax, another rank than ``shape``'s,
            or a block reaching outside ``shape``; the message says which.
    """
    parts = text.split(":") if text else []
    if len(parts) != len(shape):
        raise ValueError(f"slice {text!r} has {len(parts)} dimension(s) but the "
                         f"tensor has {len(shape)} ({list(shape)})")
    extents = []
    for d, (part, dim) in enumerate(zip(parts, shape)):
        m = _EXTENT_RE.match(part)
        if not m:
            raise ValueError(f"slice {text!r}: dimension {d} is {part!r}, not "
                             "'start,length' or '-'")
        start, length = (0, int(dim)) if part == "-" else (int(m[1]), int(m[2]))
        if start + length > dim:
            raise ValueError(f"slice {text!r}: indices [{start}, {start + length}) of "
                             f"dimension {d} lie outside the tensor's {dim}")
        extents.append((start, length))
    return tuple(extents)


def slice_shape(extents: Extents) -> tuple[int, ...]:
    """The shape of the block that resolved ``extents`` describe."""
    return tuple(length for _, length in extents)


def region(extents: Extents) -> tuple[slice, ...]:
    """numpy index of the block inside the full tensor."""
    return tuple(slice(start, start + length) for start, length in extents)


def contiguous_offset(shape: Sequence[int], extents: Extents) -> int | None:
    """Element offset of the block in the C-order full tensor if its elements
    are one contiguous run there (true of every partitioner's slices, which
    cut along the first dimension), else ``None``."""
    partial = [d for d, (ext, dim) in enumerate(zip(extents, shape))
               if ext != (0, dim)]
    last = partial[-1] if partial else 0
    if any(extents[d][1] != 1 for d in range(last)):
        return None
    offset, stride = 0, 1
    for (start, _), dim in reversed(list(zip(extents, shape))):
        offset += start * stride
        stride *= dim
    return offset


def _split_axis(shape: Sequence[int], slices: Sequence[Extents]) -> int | None:
    """The one dimension the slices cut (every other whole in every slice)."""
    cut = {d for s in slices for d, (ext, dim) in enumerate(zip(s, shape))
           if ext != (0, dim)}
    if len(cut) > 1 or not shape:
        return None
    return cut.pop() if cut else 0


def _overlap(a: Extents, b: Extents) -> bool:
    return all(sa < sb + lb and sb < sa + la for (sa, la), (sb, lb) in zip(a, b))


def uncovered(shape: Sequence[int], slices: Sequence[Extents]) -> str | None:
    """What keeps resolved ``slices`` from tiling ``shape`` exactly, or ``None``.

    Every element must be in exactly one slice: a gap would restore as
    garbage (TensorFlow fails on it only at restore time), an overlap means
    the checkpoint says two things about the same element.
    """
    blocks = [s for s in slices if math.prod(slice_shape(s)) > 0]
    axis = _split_axis(shape, blocks)
    if axis is not None:
        pos = 0
        for s in sorted(blocks, key=lambda s: s[axis]):
            start, length = s[axis]
            if start < pos:
                return (f"slice {format_slice(s)} overlaps the one before it "
                        f"(indices [{start}, {pos}) of dimension {axis})")
            if start > pos:
                return f"indices [{pos}, {start}) of dimension {axis} are in no slice"
            pos = start + length
        if pos < shape[axis] and math.prod(shape):
            return f"indices [{pos}, {shape[axis]}) of dimension {axis} are in no slice"
        return None
    if len(blocks) > MAX_BLOCK_SLICES:
        return (f"{len(blocks)} slices cut more than one dimension; at most "
                f"{MAX_BLOCK_SLICES} are checked")
    for i, a in enumerate(blocks):
        for b in blocks[i + 1:]:
            if _overlap(a, b):
                return f"slices {format_slice(a)} and {format_slice(b)} overlap"
    covered, total = sum(math.prod(slice_shape(s)) for s in blocks), math.prod(shape)
    if covered < total:
        return f"{total - covered} of the tensor's {total} elements are in no slice"
    return None
