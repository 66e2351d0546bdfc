"""How selected variables are spread over shards: pure, balanced by bytes.

Each shard becomes one ``.data-0000k-of-0000K`` file written by its own
``SaveV2`` op, so the shards are written in parallel by TensorFlow's executor.
"""

from __future__ import annotations

import heapq
from typing import Mapping

DEFAULT_BYTES_PER_SHARD = 256 * 2**20
DEFAULT_MAX_SHARDS = 16


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
        num_shards: Number of shards; clamped to ``[1, len(sizes)]``.

    Returns:
        Tensor name -> shard index in ``[0, num_shards)``. Every shard index is used.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    num_shards = max(1, min(num_shards, len(sizes)))
    heap = [(0, k) for k in range(num_shards)]
    assignment: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, shard = heapq.heappop(heap)
        assignment[name] = shard
        heapq.heappush(heap, (load + sizes[name], shard))
    return assignment
