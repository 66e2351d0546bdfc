"""Which ops of a graph a GPU can run, found without a GPU.

A GPU worker builds its whole step under ``/device:GPU:0``. TensorFlow's
kernel registry (the same in every Linux wheel: ``tensorflow[and-cuda]`` only
adds the CUDA libraries) says, per op type, which devices have a kernel and
for which dtypes; a ``DEFAULT`` kernel serves every device. An op asked onto
the GPU that has no GPU kernel for its dtypes runs on the CPU only when the
Session allows soft placement, and fails the first ``Session.run`` otherwise.
:func:`check_gpu_placement` lists those ops, the ones no device can run, and
where the collectives were asked to run, for a graph and the functions it
calls (the body of the ``steps_per_run`` loop, tf.data's functions).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable

import tensorflow as tf
from tensorflow.python.framework import kernels, op_def_registry

COLLECTIVES = frozenset({"CollectiveReduceV2", "CollectiveGatherV2",
                         "CollectiveBcastSendV2", "CollectiveBcastRecvV2",
                         "CollectiveAllToAllV2"})
_GPU_TYPES = ("GPU", "DEFAULT")
_CPU_TYPES = ("CPU", "DEFAULT")


@dataclasses.dataclass
class PlacementReport:
    """Ops asked onto a GPU, by what would run them.

    Attributes:
        on_gpu: Ops asked onto a GPU that have a GPU kernel.
        soft_placed: ``op type (dtypes) -> count`` of ops asked onto a GPU
            with no GPU kernel for their dtypes but a CPU one: they run on the
            CPU under soft placement, and fail placement without it.
        unplaceable: ``node name (op type)`` of ops no device can run.
        collectives: ``(node name, op type, requested device, has a GPU
            kernel)`` of every collective in the graph and its functions.
    """

    on_gpu: int = 0
    soft_placed: dict = dataclasses.field(default_factory=collections.Counter)
    unplaceable: list = dataclasses.field(default_factory=list)
    collectives: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line: counts, and the op types soft placement moves to the CPU."""
        moved = ", ".join(f"{k} x{v}" for k, v in sorted(self.soft_placed.items()))
        return (f"{self.on_gpu} ops on the GPU, "
                f"{sum(self.soft_placed.values())} on the CPU by soft placement"
                f"{f' ({moved})' if moved else ''}, {len(self.collectives)} "
                f"collective(s) on "
                f"{sorted({d for _, _, d, _ in self.collectives}) or 'none'}"
                + (f", UNPLACEABLE: {self.unplaceable}" if self.unplaceable else ""))


def _attr_types(value: Any) -> list:
    """The dtypes an AttrValue holds (a type or a list of types)."""
    if value.HasField("type"):
        return [value.type]
    return list(value.list.type)


def _attrs(node: Any) -> dict:
    """The node's attrs, with its op's defaults where the node leaves one out."""
    attrs = {}
    op_def = op_def_registry.get(node.op)
    if op_def is not None:
        attrs.update({a.name: a.default_value for a in op_def.attr
                      if a.HasField("default_value")})
    attrs.update(node.attr)
    return attrs


def kernel_devices(node: Any) -> set[str]:
    """``{"GPU", "CPU"}`` or part: the devices with a kernel for this
    NodeDef's op type and dtypes (kernels' type constraints checked)."""
    attrs = _attrs(node)
    found = set()
    for kernel in kernels.get_registered_kernels_for_op(node.op).kernel:
        fits = all(c.name not in attrs or set(_attr_types(attrs[c.name]))
                   <= set(c.allowed_values.list.type) for c in kernel.constraint)
        if not fits:
            continue
        if kernel.device_type in _GPU_TYPES:
            found.add("GPU")
        if kernel.device_type in _CPU_TYPES:
            found.add("CPU")
    return found


def _nodes(graph: tf.Graph) -> Iterable[tuple[Any, set]]:
    """Every NodeDef of the graph and of its function library, with the
    names of the library's functions (calls to those are not kernels)."""
    graph_def = graph.as_graph_def()
    functions = {f.signature.name for f in graph_def.library.function}
    for node in graph_def.node:
        yield node, functions
    for function in graph_def.library.function:
        for node in function.node_def:
            yield node, functions


def _dtypes(node: Any) -> str:
    types = sorted({tf.dtypes.as_dtype(t).name for v in _attrs(node).values()
                    for t in _attr_types(v) if t})
    return ",".join(types)


def check_gpu_placement(graph: tf.Graph) -> PlacementReport:
    """Where each op asked onto a GPU would run (see :class:`PlacementReport`).

    Ops with no device asked for are left to the placer, which puts each on a
    device that can run it; only explicit GPU requests can fail placement.
    """
    report = PlacementReport()
    for node, functions in _nodes(graph):
        if node.op in functions:
            continue
        devices = kernel_devices(node)
        if node.op in COLLECTIVES:
            report.collectives.append((node.name, node.op, node.device, "GPU" in devices))
        if "GPU" not in node.device.upper():
            continue
        if "GPU" in devices:
            report.on_gpu += 1
        elif "CPU" in devices:
            report.soft_placed[f"{node.op} ({_dtypes(node)})"] += 1
        else:
            report.unplaceable.append(f"{node.name} ({node.op})")
    return report
