"""How selected variables are spread over shards: pure, balanced by bytes.

Each shard becomes one ``.data-0000k-of-0000K`` file written by its own
``SaveV2`` op, so the shards are written in parallel by TensorFlow's executor.
The items balanced are variables, and each part of a partitioned variable on
its own, so a large partitioned table spreads over every shard.

A variable cannot be split across shards unless it is partitioned: one that is
over twice a balanced shard's bytes (:func:`oversized`) bounds the save time
by itself however many shards there are. That is worth a warning, not an
error (the checkpoint is still correct), and only for variables of at least
``OVERSIZE_FLOOR`` bytes, below which a save's fixed costs dominate anyway.
"""

from __future__ import annotations

import heapq
from typing import Collection, Mapping

DEFAULT_BYTES_PER_SHARD = 256 * 2**20
DEFAULT_MAX_SHARDS = 16
OVERSIZE_FLOOR = 64 * 2**20
OVERSIZE_FACTOR = 2


def default_num_shards(total_bytes: int, num_tensors: int,
                       bytes_per_shard: int = DEFAULT_BYTES_PER_SHARD,
                       max_shards: int = DEFAULT_MAX_SHARDS) -> int:
    """One shard per ``bytes_per_shard`` (rounded up), at least 1, at most
    ``max_shards`` and never more than there are tensors."""
    wanted = -(-max(total_bytes, 1) // bytes_per_shard)
    return max(1, min(wanted, max_shards, max(num_tensors, 1)))


def assign_shards(sizes: Mapping[str, int], num_shards: int) -> dict[str, int]:
    """Assigns each tensor to a shard so shard byte totals are balanced.

    Longest-processing-time greedy: biggest tensors first, each to the currently
    lightest shard (ties to the lowest index). Deterministic for equal inputs.

    Args:
        sizes: Tensor name -> bytes.
        num_shards: Number of shards; clamped to ``[1, tensors of > 0 bytes]``
            (a tensor sized only when saved, the input positions, counts 0
            bytes and shares a shard).

    Returns:
        Tensor name -> shard index in ``[0, num_shards)``. Every shard index is used.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    num_shards = max(1, min(num_shards, sum(1 for size in sizes.values() if size > 0)))
    heap = [(0, k) for k in range(num_shards)]
    assignment: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, shard = heapq.heappop(heap)
        assignment[name] = shard
        heapq.heappush(heap, (load + sizes[name], shard))
    return assignment


def oversized(sizes: Mapping[str, int], num_shards: int, unsliced: Collection[str],
              floor: int = OVERSIZE_FLOOR) -> list[tuple[str, int]]:
    """Unsliced tensors too large for ``num_shards``-way balancing.

    A tensor of more than ``OVERSIZE_FACTOR`` times the balanced shard size
    (total bytes / ``num_shards``) and at least ``floor`` bytes: its shard is
    at least that large, so the parallel save takes that much longer than a
    balanced one. Partitioning it lets every shard take a part.

    Returns:
        ``(name, bytes)`` of each, biggest first; empty for one shard.
    """
    if num_shards < 2 or not sizes:
        return []
    balanced = sum(sizes.values()) / num_shards
    found = [(n, b) for n, b in sizes.items()
             if n in unsliced and b >= floor and b > OVERSIZE_FACTOR * balanced]
    return sorted(found, key=lambda nb: (-nb[1], nb[0]))
