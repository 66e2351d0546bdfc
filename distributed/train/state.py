"""Replicated model state: non-trainable variables that a train step writes.

Workers see different data, so any variable the step writes other than
through the optimizer (batch-norm moving statistics, per-id frequency
counters, an example counter, a flag) would drift apart between replicas.
Each step therefore exchanges every such variable in the same reduction as
the gradients, and sets every replica to one value, chosen by the variable's
declared ``aggregation`` (``tf.VariableAggregation``, as ``tf.distribute``
reads it):

- ``NONE`` (the default) and ``MEAN``: the mean of the workers' new values
  (batch-norm statistics), sent and assigned as they are.
- ``SUM``: ``old + sum over workers of (new_k - old)``: every worker's
  additions count (counters). The step reads the variable before its first
  write (a control edge onto each write; a copy for reference variables),
  sends the dense delta, and adds the group size times the mean delta.
- ``ONLY_FIRST_REPLICA``: rank 0's new value (the other ranks send zeros),
  the mean times the group size (exact for 2, 4, 8 ... workers; within an
  ulp otherwise, and the same bits on every replica either way).

Each costs the variable's dense size in the step's all-reduce, however few
rows the step wrote; ``SUM`` adds one copy of the variable. Writes by rows
could be exchanged as rows (as sparse gradients are); not done yet. The
group (rank, size) comes from the reduce function's ``spec``.

Integer variables travel as float64 (the shared reduction is a mean, and an
integer ``Div`` would truncate): exact below 2**53, rounded back to the
variable's dtype; they share one float64 bucket. ``bool`` works with
``ONLY_FIRST_REPLICA`` only; other dtypes (strings) cannot be exchanged.
Either is one :class:`ConfigError` naming the variable and the fix.

A write is any op that writes a resource or reference variable: assigns,
``Scatter*``/``ScatterNd*`` (the ``Resource`` forms too), strided-slice
assigns, ``Apply*`` kernels, and function calls (``tf.cond``, ``tf.function``,
``while_loop``) whose bodies write a variable they are passed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import tensorflow as tf

from distributed.errors import ConfigError
from distributed.model.walk import variables_read_by, walk_back

NONE, SUM, MEAN, ONLY_FIRST_REPLICA = 0, 1, 2, 3
_AGGREGATION = {NONE: "NONE", SUM: "SUM", MEAN: "MEAN",
                ONLY_FIRST_REPLICA: "ONLY_FIRST_REPLICA"}

_WRITES = frozenset({"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
                     "ResourceStridedSliceAssign", "Assign", "AssignAdd", "AssignSub",
                     "StridedSliceAssign"})
# Scatter* and Apply* with a ref first input, Resource* with a resource one
# (ScatterNd, ScatterNdNonAliasingAdd and TensorScatter* write no variable:
# their first input is a plain tensor).
_WRITE_PREFIXES = ("ResourceScatter", "ResourceApply", "ResourceSparseApply",
                   "Scatter", "Apply", "SparseApply")


def _writes_by_type(op_type: str) -> bool:
    return op_type in _WRITES or op_type.startswith(_WRITE_PREFIXES)


def is_write(op: Any) -> bool:
    """Whether ``op`` writes the variable its first input holds."""
    if not _writes_by_type(op.type) or not op.inputs:
        return False
    dtype = op.inputs[0].dtype
    return dtype == tf.resource or dtype._is_ref_dtype


def written_handles(op: Any) -> list:
    """The variable handles (or refs) ``op`` writes: a write's first input,
    or a function call's resource arguments that its bodies may write
    (all but those TF marks read-only, when some body writes anything)."""
    if is_write(op):
        return [op.inputs[0]]
    names = _function_names(op.node_def.attr)
    if not names or not any(_body_writes(op.graph, n, set()) for n in names):
        return []
    try:  # indices into op.inputs (for If too: its condition is input 0)
        read_only = set(op.get_attr("_read_only_resource_inputs"))
    except ValueError:
        read_only = set()
    return [t for i, t in enumerate(op.inputs)
            if t.dtype == tf.resource and i not in read_only]


def _function_names(attrs: Any) -> list[str]:
    names = []
    for value in attrs.values():
        kind = value.WhichOneof("value")
        if kind == "func":
            names.append(value.func.name)
        elif kind == "list":
            names.extend(f.name for f in value.list.func)
    return names


def _body_writes(graph: Any, name: str, seen: set) -> bool:
    """Whether function ``name`` (or one it calls) has a write op; True when
    its definition cannot be found (then assume it writes)."""
    if name in seen:
        return False
    seen.add(name)
    definition = _definition(graph, name)
    if definition is None:
        return True
    for node in definition.node_def:
        if _writes_by_type(node.op):
            return True
        called = _function_names(node.attr)
        if _definition(graph, node.op) is not None:  # a direct call by name
            called.append(node.op)
        if any(_body_writes(graph, n, seen) for n in called):
            return True
    return False


def _definition(graph: Any, name: str) -> Any:
    """The ``FunctionDef`` of function ``name`` in ``graph`` or a graph it is
    nested in, or ``None``."""
    while graph is not None:
        fn = graph._get_function(name)
        if fn is not None:
            return getattr(fn, "cached_definition", None) or getattr(fn, "definition", None)
        graph = getattr(graph, "outer_graph", None)
    return None


def aggregation(variable: Any) -> int:
    """The variable's declared ``tf.VariableAggregation``, as an int
    (:data:`NONE`, :data:`SUM`, :data:`MEAN` or :data:`ONLY_FIRST_REPLICA`)."""
    declared = getattr(variable, "aggregation", None)
    return int(getattr(declared, "value", NONE)) if declared is not None else NONE


def step_writes(roots: Iterable[Any]) -> dict[str, list]:
    """Variable name -> the ops that write it among everything ``roots``
    (ops or tensors of the current graph) depend on.

    In a function body (the loop of ``steps_per_run``) a write's handle is a
    placeholder standing for the captured outer handle; it is followed out.
    """
    graph = tf.compat.v1.get_default_graph()
    captured = {(t.op.name, t.value_index): external
                for external, t in getattr(graph, "captures", ())}
    found: dict[str, list] = {}

    def visit(op: Any) -> bool:
        for handle in written_handles(op):
            handle = captured.get((handle.op.name, handle.value_index), handle)
            for name in variables_read_by([handle]):
                found.setdefault(name, []).append(op)
        return False  # walk on: a write may wait on other writes

    walk_back(roots, visit)
    return found


def check_exchangeable(model: str, variables: Sequence[Any]) -> None:
    """Raises :class:`ConfigError` for the first variable whose dtype its
    aggregation cannot combine across workers (bool unless
    ``ONLY_FIRST_REPLICA``; strings and other non-numbers always)."""
    for v in variables:
        dtype, agg = v.dtype.base_dtype, aggregation(v)
        if dtype.is_floating or dtype.is_integer or (
                dtype == tf.bool and agg == ONLY_FIRST_REPLICA):
            continue
        if dtype == tf.bool:
            why = f"workers cannot {'add' if agg == SUM else 'average'} bool values"
            fix = ("declare it with aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA "
                   "(rank 0's value) or make it an integer counter")
        else:
            why = f"{dtype.name} values cannot be exchanged between workers"
            fix = ("make it a local variable (collections=[tf.compat.v1.GraphKeys."
                   "LOCAL_VARIABLES]) that each worker keeps for itself, or do not "
                   "write it in the train step")
        raise ConfigError(
            f"model: {model}: variable '{v.op.name}' ({dtype.name}, aggregation "
            f"{_AGGREGATION.get(agg, agg)}) is written in the train step and must stay "
            f"identical on every worker, but {why}; {fix}")


@dataclasses.dataclass(frozen=True)
class Group:
    """The workers a reduce averages over, and this one's place among them."""

    rank: int
    size: int


def group_of(reduce_fn: Callable | None) -> Group | None:
    """The group of ``reduce_fn``: its ``spec`` (a :class:`collective.GroupSpec`,
    e.g. ``functools.partial(allreduce_gradients, spec=...)``); one worker for
    no reduce; ``None`` for a reduce that names no group."""
    if reduce_fn is None:
        return Group(0, 1)
    spec = (getattr(reduce_fn, "spec", None)
            or getattr(reduce_fn, "keywords", {}).get("spec"))
    return None if spec is None else Group(spec.rank, spec.group_size)


def exchange_for(model: str, created: Sequence[Any], update_ops: Sequence[Any],
                 loss: Any, reduce_fn: Callable | None) -> "Exchange":
    """The :class:`Exchange` of the non-trainable variables among ``created``
    (the model function's) that the step writes: through ``update_ops`` or
    through ops the ``loss`` waits on."""
    trainable = {v.op.name for v in tf.compat.v1.trainable_variables()}
    by_updates = step_writes(update_ops)
    writes = step_writes(list(update_ops) + [loss])
    variables = [v for v in created if v.op.name not in trainable and v.op.name in writes]
    check_exchangeable(model, variables)
    # The new values are read after UPDATE_OPS, and after writes only the loss waits on.
    later = {op.name: op for v in variables for op in writes[v.op.name]
             if op not in by_updates.get(v.op.name, ())}
    return Exchange(variables, writes, group_of(reduce_fn),
                    list(update_ops) + [later[n] for n in sorted(later)])


class Exchange:
    """One step's exchange of model state: what each replica sends through
    the gradients' reduce (a mean over workers), and the variables' new
    values made from the means, the same bits on every replica.

    Float variables averaged (``NONE``, ``MEAN``: batch norm) and every
    variable of a single worker are sent and assigned as they are.
    """

    def __init__(self, variables: Sequence[Any], writes: dict[str, list],
                 group: Group | None, after: Sequence[Any] = ()):
        self.variables = list(variables)
        self._group = group
        self._after = list(after)
        self._old: dict[str, Any] = {}
        for v in self.variables:
            if self._plain(v):
                continue
            if group is None:
                raise ValueError(f"reduce_fn names no group (spec), so variable "
                                 f"'{v.op.name}' ({v.dtype.base_dtype.name}, "
                                 f"{_AGGREGATION.get(aggregation(v))}) cannot be reduced")
            if aggregation(v) == SUM:
                old = _snapshot(v)
                for op in writes.get(v.op.name, ()):
                    op._add_control_input(old.op)  # read before the step writes it
                self._old[v.op.name] = old

    def _plain(self, v: Any) -> bool:
        return (self._group is not None and self._group.size == 1) or (
            v.dtype.base_dtype.is_floating and aggregation(v) in (NONE, MEAN))

    def sent(self) -> list:
        """What this replica sends, one tensor per variable, read after the
        step's writes (``after``)."""
        with tf.control_dependencies(self._after):
            new = [tf.identity(v.read_value()) for v in self.variables]
        return [x if self._plain(v) else self._contribution(v, x)
                for v, x in zip(self.variables, new)]

    def _contribution(self, v: Any, new: Any) -> Any:
        wide = not v.dtype.base_dtype.is_floating  # integers, bool: float64
        new = tf.cast(new, tf.float64) if wide else new
        agg = aggregation(v)
        if agg == SUM:
            old = self._old[v.op.name]
            return new - (tf.cast(old, tf.float64) if wide else old)
        if agg == ONLY_FIRST_REPLICA and self._group.rank != 0:
            return tf.zeros_like(new)
        return new

    def assigns(self, means: Sequence[Any]) -> list:
        """Ops that set each variable from its reduced (mean) tensor."""
        return [v.assign(mean if self._plain(v) else self._value(v, mean),
                         read_value=False)
                for v, mean in zip(self.variables, means)]

    def _value(self, v: Any, mean: Any) -> Any:
        agg, dtype = aggregation(v), v.dtype.base_dtype
        total = mean * self._group.size if agg in (SUM, ONLY_FIRST_REPLICA) else mean
        if dtype == tf.bool:
            total = total > 0.5
        elif not dtype.is_floating:
            total = tf.cast(tf.round(total), dtype)
        return self._old[v.op.name] + total if agg == SUM else total


def _snapshot(v: Any) -> Any:
    """``v``'s value, read as a copy: a reference variable's writes are in
    place, so it is copied; a resource variable's read already is one (its
    writes copy a buffer that a read still holds)."""
    value = v.read_value()
    if v.op.type in ("VariableV2", "Variable"):
        value = tf.raw_ops.DeepCopy(x=value)
    return value
