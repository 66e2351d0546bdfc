"""Partitioned variables in a graph: which block of which logical tensor each
variable is, and a clear refusal when two graphs of a run partition alike-named
variables differently.

The coordinator hands values to workers (and evaluation, and restores) by
variable name, part by part (``emb/part_0`` ...). That only works if every
graph of the run cuts each partitioned variable into the same parts; a
partitioner that depends on the worker (its devices, a rank-dependent
``max_partitions``) would otherwise surface as a ``KeyError`` or a TensorFlow
feed-shape traceback. :func:`check_values_fit` names the variable and both
layouts instead.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from distributed.checkpoint import slices
from distributed.errors import PartitionMismatchError

_PART_SUFFIX_RE = re.compile(r"/part_\d+$")


@dataclasses.dataclass(frozen=True)
class Part:
    """Where one graph variable's value is in a (logical) checkpoint tensor.

    Attributes:
        variable: The graph variable's op name (``emb/part_1``).
        tensor: The logical tensor's name (``emb``; the variable's own name
            when it is not partitioned).
        full_shape: The logical tensor's shape.
        extents: The variable's block of it (resolved; all of it when whole).
        sliced: Whether the variable is a part of a partitioned variable.
    """

    variable: str
    tensor: str
    full_shape: tuple[int, ...]
    extents: slices.Extents
    sliced: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return slices.slice_shape(self.extents)


def part_of(variable: Any) -> Part:
    """The :class:`Part` a ``tf.Variable`` is (from its ``SaveSliceInfo``);
    an unknown dimension (``validate_shape=False``) stays ``None``."""
    shape = tuple(d if d is None else int(d) for d in variable.shape.as_list())
    info = getattr(variable, "_save_slice_info", None)
    if info is None:
        return Part(variable.op.name, variable.op.name, shape,
                    tuple((0, d) for d in shape), False)
    extents = tuple(zip(map(int, info.var_offset), map(int, info.var_shape)))
    return Part(variable.op.name, info.full_name,
                tuple(int(d) for d in info.full_shape), extents, True)


def _describe(parts: Mapping[str, tuple[int, ...]]) -> str:
    items = [f"{n} {list(s)}" for n, s in sorted(parts.items())]
    return ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4
                                   else "")


def check_values_fit(variables: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Refuses values that do not fit a graph's variables part for part.

    Args:
        variables: The receiving graph's variables by op name.
        values: Arrays by the sending graph's variable names.

    Raises:
        PartitionMismatchError: A value's shape differs from its variable's,
            or a value is a part (or the whole) of a variable that this graph
            partitions otherwise; names the variable and both layouts.
        KeyError: A value belongs to no variable of this graph at all.
    """
    ours = {n: part_of(variables[n]) for n in values if n in variables}
    if all(_fits(p.shape, values[n]) for n, p in ours.items()) \
            and len(ours) == len(values):
        return
    every = [part_of(v) for v in variables.values()]
    tensors = {p.tensor for p in every}
    sent: dict[str, dict[str, tuple[int, ...]]] = {}
    unknown = []
    for name, value in values.items():
        shape = tuple(np.shape(value))
        if name in ours and _fits(ours[name].shape, value):
            continue
        tensor = ours[name].tensor if name in ours else _tensor_of(name, tensors)
        if tensor is None:
            unknown.append(name)
            continue
        sent.setdefault(tensor, {})[name] = shape
    for tensor, theirs in sorted(sent.items()):
        here = {p.variable: p.shape for p in every if p.tensor == tensor}
        theirs = {**{n: tuple(np.shape(values[n])) for n in values
                     if _tensor_of(n, {tensor}) == tensor}, **theirs}
        raise PartitionMismatchError(
            f"variable {tensor!r} is partitioned differently in the graph that sent "
            f"its values ({_describe(theirs)}) and in this one ({_describe(here)}). "
            "Every graph of a run must partition it alike: use a partitioner that "
            "depends only on the variable's shape (e.g. partitioner=tf.compat.v1."
            "fixed_size_partitioner(n) with the same n everywhere), not on the "
            "worker, its devices or its rank")
    if unknown:
        raise KeyError(f"no variable named {sorted(unknown)[:5]}")


def _fits(shape: tuple, value: Any) -> bool:
    """Whether ``value`` has ``shape`` (``None`` dimensions match any size)."""
    got = np.shape(value)
    return len(got) == len(shape) and all(a is None or a == b
                                          for a, b in zip(shape, got))


def _tensor_of(name: str, tensors: set[str]) -> str | None:
    """The logical tensor a value name belongs to, if it is one of ``tensors``:
    itself, or with its ``/part_N`` suffix dropped."""
    if name in tensors:
        return name
    base = _PART_SUFFIX_RE.sub("", name)
    return base if base in tensors else None
