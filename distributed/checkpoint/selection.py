"""Which variables a checkpoint holds: a pure function of a graph and a spec.

A selection is a *policy* plus ``include``/``exclude`` regexes on variable names:

* ``trainable``: trainable variables only (the classic
  ``Saver(var_list=tf.compat.v1.trainable_variables())`` recipe).
* ``inference``: the trainable ones plus every non-trainable variable that the
  predict-mode outputs read (batch-norm moving statistics, EMA shadows), found by
  walking the graph back from the outputs. Optimizer slots and step counters are
  never read by the outputs, so they are never picked.
* ``all``: every global variable (the full tier, for resuming training).

Then names matching any ``include`` regex are kept (no ``include`` keeps all) and
names matching any ``exclude`` regex are dropped. Regexes use ``re.search``;
anchor with ``^`` for scope prefixes (``^tower/``).

A partitioned variable (``get_variable(..., partitioner=...)``: parts
``emb/part_0`` ...) is selected or not as a whole, by its logical name
(``emb``, what the checkpoint holds): the regexes see ``emb``, never the part
names, and when the policy picks any part (the predict outputs read it) it
picks all of them. A checkpoint with some parts of a table could not be
restored.

The trainable-only recipe silently drops batch-norm statistics, and inference
then runs with their initial values; :func:`select` warns, naming them.

``serve_ema`` changes which *values* are saved, not which names: a selected
variable that has an exponential moving average is saved under its own name
with its average's value (:func:`checkpoint_sources`), so a stock ``Saver`` of
the model's variables restores the averages with no change to the predict graph.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from typing import Any, Collection, Iterable, Mapping, Sequence

from distributed.errors import SelectionError
from distributed.model.walk import variables_read_by

POLICIES = ("trainable", "inference", "all")


class MissingInferenceVariablesWarning(UserWarning):
    """A selection leaves out variables that the inference outputs read."""


def _compile_all(patterns: Sequence[str], field: str) -> tuple[re.Pattern, ...]:
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise SelectionError(
            f"selection.{field}: expected a list of regexes, got {patterns!r}")
    compiled = []
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise SelectionError(
                f"selection.{field}[{i}]: expected a regex string, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise SelectionError(
                f"selection.{field}[{i}]: regex {pattern!r} does not compile: {e}. "
                "Escape special characters (e.g. '\\.' for a literal dot).") from e
    return tuple(compiled)


@dataclasses.dataclass(frozen=True)
class SelectionSpec:
    """What to save.

    Attributes:
        policy: ``trainable`` (default), ``inference`` or ``all``.
        include: Keep only names matching any of these regexes (empty: keep all).
        exclude: Drop names matching any of these regexes.
        serve_ema: Save each selected variable's exponential moving average
            (``optimizer.ema_decay``) under the variable's own name.
    """

    policy: str = "trainable"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    serve_ema: bool = False

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise SelectionError(
                f"selection.policy: {self.policy!r} is not a policy; use one of "
                f"{', '.join(POLICIES)}")
        object.__setattr__(self, "include", tuple(self.include)
                           if isinstance(self.include, list) else self.include)
        object.__setattr__(self, "exclude", tuple(self.exclude)
                           if isinstance(self.exclude, list) else self.exclude)
        if not isinstance(self.serve_ema, bool):
            raise SelectionError(
                f"selection.serve_ema: expected true or false, got {self.serve_ema!r}")
        object.__setattr__(self, "_include_re", _compile_all(self.include, "include"))
        object.__setattr__(self, "_exclude_re", _compile_all(self.exclude, "exclude"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SelectionSpec":
        """Builds a spec from config data, rejecting unknown keys by name."""
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SelectionError(
                f"selection: unknown key(s) {sorted(unknown)}; valid keys are "
                "policy, include, exclude, serve_ema")
        return cls(**d)

    def to_json(self) -> str:
        ema = {"serve_ema": True} if self.serve_ema else {}  # older JSON unchanged
        return json.dumps({"policy": self.policy, "include": list(self.include),
                           "exclude": list(self.exclude), **ema}, sort_keys=True)

    def matches_name(self, name: str) -> bool:
        """Applies only the include/exclude filters to one name."""
        inc, exc = self._include_re, self._exclude_re
        if inc and not any(p.search(name) for p in inc):
            return False
        return not any(p.search(name) for p in exc)


@dataclasses.dataclass(frozen=True)
class VariableInfo:
    """What selection needs to know about one variable (no TF objects).

    ``partition_of`` is the logical name of the partitioned variable this is
    a part of (``emb`` for ``emb/part_0``), ``None`` for a whole variable.
    """

    name: str
    trainable: bool
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    partition_of: str | None = None

    @property
    def logical_name(self) -> str:
        """The name the checkpoint holds it under (and selection regexes see)."""
        return self.partition_of or self.name


@dataclasses.dataclass(frozen=True)
class Selection:
    """The result of :func:`select`.

    Attributes:
        names: Selected variable names, in the order the variables were given.
        missing_reads: Variables the inference outputs read that the selection
            leaves out; inference from this checkpoint would use their initial
            values. Empty when no outputs were given.
    """

    names: tuple[str, ...]
    missing_reads: tuple[str, ...] = ()


def select(variables: Sequence[VariableInfo], spec: SelectionSpec,
           output_reads: Collection[str] | None = None) -> Selection:
    """Chooses variables by policy, then by include/exclude regexes. No I/O.

    Args:
        variables: All global variables of the model.
        spec: The selection spec.
        output_reads: Names of the variables the predict-mode outputs read
            (see :func:`variables_read_by`). Required by ``inference``; for the
            other policies it enables the missing-variables warning.

    Raises:
        SelectionError: ``inference`` without ``output_reads``, or nothing selected.
    """
    if spec.policy == "inference" and output_reads is None:
        raise SelectionError(
            "selection.policy 'inference' needs the predict-mode outputs to find "
            "the non-trainable variables they read")
    reads = set(output_reads or ())
    if spec.policy == "all":
        by_policy = [v for v in variables]
    elif spec.policy == "inference":
        by_policy = [v for v in variables if v.trainable or v.name in reads]
    else:
        by_policy = [v for v in variables if v.trainable]
    # Whole partitioned variables: a part picked by policy picks its siblings.
    groups = {v.logical_name for v in by_policy if spec.matches_name(v.logical_name)}
    names = tuple(v.name for v in variables if v.logical_name in groups)
    if not names:
        logical = list(dict.fromkeys(v.logical_name for v in variables))
        sample = ", ".join(logical[:8]) or "(none)"
        raise SelectionError(
            f"selection {spec.to_json()} matches no variable. The graph has "
            f"{len(logical)} variable(s), e.g. {sample}. Check the include/"
            "exclude regexes (they use re.search) and the policy.")
    chosen = set(names)
    missing = tuple(sorted({v.logical_name for v in variables
                            if v.name in reads and v.name not in chosen}))
    if missing and spec.policy != "all":
        hint = ("; use policy: inference to keep them"
                if spec.policy == "trainable" else
                "; your include/exclude regexes drop them")
        warnings.warn(
            f"selection {spec.to_json()} leaves out {len(missing)} variable(s) "
            f"that the inference outputs read: {', '.join(missing)}. A model "
            "restored from these checkpoints would run with their initial "
            f"values{hint}.", MissingInferenceVariablesWarning, stacklevel=2)
    return Selection(names=names, missing_reads=missing)


def checkpoint_sources(names: Sequence[str], averages: Mapping[str, str],
                       serve_ema: bool) -> dict[str, str]:
    """Checkpoint name -> name of the variable whose value is saved under it.

    The mapping goes one way, from the names a checkpoint holds to the graph's
    variables. It is the identity, except with ``serve_ema``: a selected
    variable with an average (``averages``: variable name -> its average's)
    is saved under its own name with the average's value. Variables without
    one (batch-norm statistics) keep their own values.
    """
    return {n: averages.get(n, n) if serve_ema else n for n in names}


def describe_variables(variables: Iterable[Any]) -> list[VariableInfo]:
    """Turns ``tf.Variable`` objects into :class:`VariableInfo` values."""
    trainable_names = None
    infos = []
    for v in variables:
        if trainable_names is None:
            trainable_names = {t.op.name for t in v.graph.get_collection(
                "trainable_variables")}
        part = getattr(v, "_save_slice_info", None)
        infos.append(VariableInfo(
            name=v.op.name,
            trainable=v.op.name in trainable_names,
            dtype=v.dtype.base_dtype.name,
            shape=tuple(int(d) for d in v.shape.as_list()),
            partition_of=part.full_name if part is not None else None,
        ))
    return infos


def select_variables(graph, spec: SelectionSpec, outputs: Iterable[Any] | None = None):
    """Selects ``tf.Variable`` objects of ``graph``; see :func:`select`.

    Args:
        graph: A ``tf.Graph`` holding the model's variables.
        spec: The selection spec.
        outputs: Predict-mode output tensors built in ``graph`` (needed for
            ``inference``; enables the missing-variables warning otherwise).

    Returns:
        ``(variables, selection)``: the chosen variables in graph order and the
        :class:`Selection` describing them.
    """
    all_vars = list(graph.get_collection("variables"))
    reads = variables_read_by(outputs) if outputs is not None else None
    selection = select(describe_variables(all_vars), spec, reads)
    chosen = set(selection.names)
    return [v for v in all_vars if v.op.name in chosen], selection
