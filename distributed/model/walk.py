"""Questions about a model's graph answered by walking its ops back from some
outputs: which variables they read, which placeholders they need fed.

A leaf: it imports neither TensorFlow nor anything of ours (it only follows
``op.inputs`` and ``op.control_inputs``), so the checkpoint selection can ask
what the predict outputs read without depending on graph building, and the
model adapters, training and export all ask the same way.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

# Op types that own a variable's storage; reading a variable reaches one of these.
_VARIABLE_OP_TYPES = frozenset(
    {"VarHandleOp", "VariableV2", "Variable", "_VarHandlesOp"})


def walk_back(roots: Iterable[Any], is_leaf) -> list[Any]:
    """Ops reached by walking data and control inputs back from ``roots``.

    The walk stops at (and returns) ops for which ``is_leaf(op)`` is true; it
    does not continue past them. Each op is visited once.
    """
    seen: set[int] = set()
    stack = [getattr(o, "op", o) for o in roots]
    leaves = []
    while stack:
        op = stack.pop()
        if id(op) in seen:
            continue
        seen.add(id(op))
        if is_leaf(op):
            leaves.append(op)
            continue
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return leaves


def variables_read_by(outputs: Iterable[Any]) -> set[str]:
    """Names of the variables that ``outputs`` (tensors or ops) depend on.

    Walks data and control inputs back from the outputs to the ops that own
    variable storage (``VarHandleOp`` for resource variables, ``VariableV2`` for
    ref variables). Reads inside ``tf.function`` bodies are found through the
    captured handle, which is an input of the call op.
    """
    return {op.name for op in walk_back(
        outputs, lambda op: op.type in _VARIABLE_OP_TYPES)}


def placeholders_needed(ops: Sequence[Any]) -> list[frozenset]:
    """For each op (or tensor) in ``ops``, the names of the ``Placeholder`` ops
    it depends on (through data and control inputs): what running it needs fed.

    One walk over the graph serves all of ``ops`` (each op's set is memoized),
    so it costs about the graph's size, not its size per op. The back edges of
    v1 ``while`` loops are ignored; a placeholder a loop reads enters it
    through a forward edge anyway.
    """
    memo: dict[Any, frozenset] = {}
    for root in ops:
        stack, active = [(getattr(root, "op", root), False)], set()
        while stack:
            op, expanded = stack.pop()
            if op in memo:
                continue
            parents = [t.op for t in op.inputs] + list(op.control_inputs)
            if expanded:
                own = frozenset([op.name]) if op.type == "Placeholder" else frozenset()
                memo[op] = own.union(*(memo.get(p, frozenset()) for p in parents))
                active.discard(op)
            elif op not in active:
                active.add(op)
                stack.append((op, True))
                stack.extend((p, False) for p in parents
                             if p not in memo and p not in active)
    return [memo[getattr(o, "op", o)] for o in ops]


__all__ = ["placeholders_needed", "variables_read_by", "walk_back"]
