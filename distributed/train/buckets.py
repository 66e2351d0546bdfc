"""Planning the gradient buckets: which gradients one collective reduces.

Pure Python, so every rank computes the same plan from the same variables; see
:func:`distributed.train.collective.allreduce_gradients` for how a bucket is reduced.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from distributed.errors import ConfigError

DEFAULT_BUCKET_BYTES = 8 * 2**20


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Gradients reduced by one collective.

    Attributes:
        dtype: Dtype name shared by every member.
        indices: Positions in the input list, in concat order.
        num_bytes: Total bytes of the members.
    """

    dtype: str
    indices: tuple[int, ...]
    num_bytes: int


def plan_buckets(items: Sequence[tuple[str, int]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Groups gradients into buckets; pure, so every rank gets the same plan.

    Gradients are taken in reverse order (the last layers' gradients are
    produced first by backprop, so their bucket can start reducing earlier),
    grouped by dtype, and a bucket is closed when the next member would push
    it past ``bucket_bytes``. A gradient bigger than that gets a bucket alone.
    Buckets come in the order they were closed, then the ones still open at
    the end in the order they were opened.

    Args:
        items: ``(dtype name, bytes)`` per gradient, in variable order.
        bucket_bytes: Upper bound on a bucket's bytes.
    """
    if bucket_bytes <= 0:
        raise ConfigError(f"bucket_bytes: expected > 0, got {bucket_bytes!r}")
    done: list[Bucket] = []
    open_: dict[str, tuple[list[int], int]] = {}
    for index in reversed(range(len(items))):
        dtype, size = items[index]
        members, total = open_.get(dtype, ([], 0))
        if members and total + size > bucket_bytes:
            done.append(Bucket(dtype, tuple(members), total))
            members, total = [], 0
        open_[dtype] = (members + [index], total + size)
    rest = sorted(open_.items(), key=lambda kv: -kv[1][0][0])
    done.extend(Bucket(d, tuple(m), t) for d, (m, t) in rest)
    return done
