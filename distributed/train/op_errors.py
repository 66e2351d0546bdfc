"""A TensorFlow error raised by the user's ops, told as one short message.

A ``Session.run`` that fails in an op the user's ``model_fn`` (or ``input_fn``)
made raises an ``OpError`` whose text is TF's internals, and a Ray actor wraps
that in its own frames (the ``OpError`` itself does not even pickle). Such an
error is the user's: a restart would only fail again. :func:`user_op_error`
turns it into a :class:`~distributed.errors.StepError` naming the op, TF's own
message, the user's source lines that created the op (TensorFlow keeps every
op's creation stack, ``op.traceback``) and a hint where one fits.

Errors of collectives and of dead or stalled peers (deadline exceeded,
unavailable, aborted, cancelled) are infrastructure: :func:`user_op_error`
returns ``None`` for them and the trainer restarts the worker group.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
from typing import Any

from distributed.errors import StepError

# TF error classes a dead or stalled peer causes in a collective step.
INFRASTRUCTURE_ERRORS = frozenset({"DeadlineExceededError", "UnavailableError",
                                   "AbortedError", "CancelledError"})
MAX_FRAMES = 6

_NODE = re.compile(r"\{\{node ([^}]+)\}\}")
_DETECTED = re.compile(r"Node: '([^']+)'")
_FROM_TASK = re.compile(r"^From /job:[^ ]*:$")  # a distributed Session's prefix

# (pattern in TF's message, hint). First match wins.
_HINTS = (
    (re.compile(r"is not in \[0, \d+\)"),
     "an id is outside its table: map ids into [0, rows) in the input "
     "(tf.math.floormod, hashing, a vocabulary with OOV buckets) or make the "
     "table bigger"),
    (re.compile(r"StringToNumberOp could not|Cast string to"),
     "a string reached an op that expects a number: parse or encode it in the "
     "input function, or check which column is the label"),
    (re.compile(r"Table not initialized"),
     "a lookup table was made outside model_fn or input_fn's graph; build it "
     "in model_fn (tables there are initialized by the framework)"),
    (re.compile(r"(Tensor had (NaN|Inf) values|CheckNumerics)"),
     "a check_numerics op found a NaN or Inf: lower optimizer.learning_rate, "
     "clip gradients (optimizer.clip_global_norm) or check the input"),
    (re.compile(r"Incompatible shapes|Matrix size-incompatible|shape mismatch|"
                r"must have the same shape|Input to reshape"),
     "a batch's shape differs from what the model expects: check input_fn's "
     "shapes against the model's (and the last, partial batch)"),
    (re.compile(r"Received a label value of"),
     "a label is outside [0, classes): check the labels and the model's number "
     "of classes"),
)


def user_op_error(error: BaseException, graph: Any, where: str) -> StepError | None:
    """The :class:`StepError` for ``error``, or ``None`` when it is not the user's.

    Args:
        error: What ``Session.run`` raised.
        graph: The graph that ran (to find the op by name when the error does
            not carry it, as for ops inside the loop of ``steps_per_run``).
        where: What ran, for the first line (e.g. ``"step 26 on worker 1"``).
    """
    import tensorflow as tf
    if not isinstance(error, tf.errors.OpError):
        return None
    kind = type(error).__name__
    if kind in INFRASTRUCTURE_ERRORS or kind == "OutOfRangeError":
        return None
    op = _find_op(error, graph)
    if op is not None and op.type.startswith("Collective"):
        return None
    message = tf_message(error)
    lines = [f"{where}: {kind} in op {_describe_op(op, error)}: {message}"]
    frames = user_frames(op)
    if frames:
        lines.append("  the op was made at (most recent call last):")
        for frame in frames:
            lines.append(f"    {frame.filename}:{frame.lineno} in {frame.name}")
            source = frame.line or linecache.getline(frame.filename, frame.lineno)
            if source.strip():
                lines.append(f"      {source.strip()}")
    hint = next((h for pattern, h in _HINTS if pattern.search(message)), None)
    if hint:
        lines.append(f"  hint: {hint}")
    return StepError("\n".join(lines), op=op.name if op is not None else None,
                     kind=kind, tf_message=message)


def tf_message(error: Any) -> str:
    """TF's own message, without the "Graph execution error" preamble, the
    creation stack TF appends and the ``[[{{node ...}}]]`` trailer."""
    text = str(getattr(error, "message", error))
    if "\nNode: '" in text:  # "Detected at node ... defined at ... Node: 'x'\n<msg>"
        text = text.split("\nNode: '", 1)[1].split("\n", 1)[-1]
    kept = [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("[[")
            and not line.startswith("Graph execution error")
            and not _FROM_TASK.match(line.strip())]
    if not kept:
        return type(error).__name__
    out = kept[0]
    return out if len(out) <= 400 else out[:397] + "..."


def picklable(error: Any) -> Exception:
    """The same TF error class and message without the op (an ``OpError``
    holding its ``Operation`` cannot cross to another process), so the
    driver can still tell a dead peer's error by its class."""
    return type(error)(None, None, tf_message(error))


def _find_op(error: Any, graph: Any) -> Any:
    op = getattr(error, "op", None)
    if op is not None:
        return op
    text = str(getattr(error, "message", ""))
    for pattern in (_DETECTED, _NODE):
        match = pattern.search(text)
        if match and graph is not None:
            for g in _graphs(graph):
                try:
                    return g.get_operation_by_name(match.group(1))
                except (KeyError, ValueError):
                    pass
    return None


def _graphs(graph: Any) -> list:
    """``graph`` and the bodies of its control-flow-v2 loops and conditionals
    (the loop of ``steps_per_run`` builds the model there), nested too."""
    out, todo = [], [graph]
    while todo:
        g = todo.pop()
        out.append(g)
        for op in g.get_operations():
            for attr in ("_body_graph", "_cond_graph", "_true_graph", "_false_graph"):
                inner = getattr(op, attr, None)
                if inner is not None and inner not in out:
                    todo.append(inner)
    return out


def _describe_op(op: Any, error: Any) -> str:
    if op is not None:
        return f"'{op.name}' ({op.type})"
    match = _DETECTED.search(str(getattr(error, "message", ""))) or \
        _NODE.search(str(getattr(error, "message", "")))
    return f"'{match.group(1)}'" if match else "(unknown)"


def _dirs(*modules: str) -> tuple[str, ...]:
    out = []
    for name in modules:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            out.append(os.path.dirname(path) + os.sep)
    return tuple(out)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_EXAMPLES = os.path.join(_PACKAGE, "examples") + os.sep


def user_frames(op: Any) -> list:
    """The user's frames of ``op``'s creation stack: the innermost call into
    the user's code (a ``model_fn`` the framework called, and what it called
    through TensorFlow or Keras), at most :data:`MAX_FRAMES`, innermost last.
    ``distributed/examples`` counts as the user's."""
    if op is None:
        return []
    try:
        stack = list(op.traceback)
    except Exception:  # an op imported from a GraphDef has no stack
        return []
    tf_dirs = _dirs("tensorflow", "tf_keras", "keras", "numpy")
    # The framework and what runs it: this package, Ray, pytest, the stdlib.
    runner = _dirs("ray", "pytest", "_pytest", "pluggy") + (
        os.path.dirname(os.__file__) + os.sep, _PACKAGE)

    def kind(filename: str) -> str:
        if filename.startswith(_EXAMPLES):
            return "user"
        if filename.startswith("<") or filename.startswith(runner):
            return "runner"
        return "tf" if filename.startswith(tf_dirs) else "user"

    kinds = [kind(f.filename) for f in stack]
    if "user" not in kinds:
        return []
    last = len(kinds) - 1 - kinds[::-1].index("user")
    first = last
    while first > 0 and kinds[first - 1] != "runner":
        first -= 1
    return [f for f, k in zip(stack[first:last + 1], kinds[first:last + 1])
            if k == "user"][-MAX_FRAMES:]
