"""Which checkpoint tensor, and which block of it, each predict-graph variable
restores from.

The predict graph may partition a table differently from training, or not at
all: a checkpoint holds a partitioned variable as one logical tensor
(``emb``), so each graph variable names its logical tensor and its block of
it (:func:`distributed.checkpoint.partition.part_of`), and the restore reads
the logical tensor whole and hands each part its block. Scope maps
(``--map``) apply to the logical name.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping

from distributed.checkpoint import slices
from distributed.checkpoint.manifest import Manifest
from distributed.checkpoint.partition import Part, part_of
from distributed.errors import CheckpointNotFoundError, ConfigError


def restore_plan(variables: Mapping[str, Any], reads: Collection[str],
                 trainable: Collection[str], manifest: Manifest,
                 to_ckpt: Callable[[str], str], what: str) -> dict[str, Part]:
    """Graph variable name -> where its value is, for each variable in ``reads``.

    Args:
        variables: The predict graph's variables by op name.
        reads: Names of the variables the inference outputs read.
        trainable: Names of its trainable variables (for the hint on missing ones).
        manifest: The checkpoint's manifest.
        to_ckpt: Maps a graph (logical) name to the checkpoint's (scope maps).
        what: How messages name the checkpoint (``serving checkpoint at step 40``).

    Raises:
        CheckpointNotFoundError: Variables the outputs read are not in the
            checkpoint (named, with the likely cause).
        ConfigError: A variable's whole (logical) shape or dtype differs from
            the checkpoint's.
    """
    plan, logical = {}, {}
    for name in sorted(reads):
        part = part_of(variables[name])
        logical[name] = part.tensor
        plan[name] = Part(name, to_ckpt(part.tensor), part.full_shape, part.extents,
                          part.sliced)
    groups = manifest.by_name()
    _check_missing(plan, logical, groups, trainable, what)
    for name, part in plan.items():
        row = groups[part.tensor][0]
        dtype = variables[name].dtype.base_dtype.name
        if tuple(row.shape) != part.full_shape or row.dtype != dtype:
            whole = " (all its parts together)" if part.sliced else ""
            raise ConfigError(
                f"the predict graph's variable {name!r} is part of {dtype}"
                f"{list(part.full_shape)}{whole}, but {what} holds {part.tensor!r} as "
                f"{row.dtype}{list(row.shape)}; build the predict graph with the "
                "checkpoint's shapes (the run's model_params, or a matching --model)")
    return plan


def _check_missing(plan: Mapping[str, Part], logical: Mapping[str, str],
                   groups: Mapping[str, Any], trainable: Collection[str],
                   what: str) -> None:
    """Raises naming each logical variable the checkpoint lacks."""
    absent = {p.tensor: (p.variable, logical[p.variable]) for p in plan.values()
              if p.tensor not in groups}
    if not absent:
        return
    missing = sorted(logical + (f" (as {ckpt})" if ckpt != logical else "")
                     for ckpt, (_, logical) in absent.items())
    non_trainable = [v for v, _ in absent.values() if v not in trainable]
    hint = (" These are non-trainable (e.g. batch-norm moving statistics): the "
            "run's selection probably used policy: trainable; train with "
            "selection policy: inference." if non_trainable else
            " Check the selection's include/exclude regexes and --map.")
    raise CheckpointNotFoundError(
        f"{what} lacks {len(missing)} variable(s) the inference outputs read: "
        f"{', '.join(missing)}.{hint}")


def block(tensors: Mapping[str, Any], part: Part):
    """The value of ``part``'s variable: its block of the whole tensor."""
    whole = tensors[part.tensor]
    return whole[slices.region(part.extents)] if part.sliced else whole
