"""Consistent snapshots of a training graph's variables for async checkpoints.

Rank 0 must hand the coordinator the variables' values as of a checkpoint
step while training goes on. Fetching them with ``sess.run`` copies every byte
on the training thread. Instead, :meth:`VariableSnapshot.take` assigns each
variable's current value to a shadow variable of its own. On CPU this copies
nothing: TensorFlow's resource variables are copy-on-write, so the shadow and
the variable share one buffer, and the next training step's update ops give
the variable a fresh buffer and leave the old one (the snapshot) untouched.
On GPU the shadow lives in host memory, so taking it is one device-to-host
copy, done by TensorFlow's own executor. Reference variables (TF1's
``use_resource=False``) are updated in place, so theirs is one copy too.

:meth:`VariableSnapshot.fetch` then reads the shadows into numpy arrays and
destroys them in the same ``Session.run``, so a snapshot holds memory only
while it is being handed off; it is meant to run on a background thread.

With parameter servers (:mod:`distributed.train.ps`) the shadows of the
servers' variables live on their servers, alias their buffers there alike, and
are never fetched: the coordinator has each server save its own
(:class:`~distributed.train.ps.ServerSaver`) and frees them.

NOTE: one snapshot at a time; :meth:`take` must not run while a :meth:`fetch`
is in flight (rank 0's checkpointer allows one save in flight).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

_CONTAINER = "dtr_snapshot"


class VariableSnapshot:
    """Shadow variables, and the ops that take and fetch named groups of them.

    Every op is built here, up front: nothing grows the graph later, while a
    background :meth:`fetch` and the training thread share the Session.

    Args:
        variables: Resource variables of one graph (the training graph).
        groups: Group name -> names of the variables it snapshots.
        remote: Names of variables whose shadows stay where they live
            (a parameter server's) and are not fetched: :meth:`fetch` returns
            the rest of the group.
    """

    def __init__(self, variables: Sequence[tf.Variable],
                 groups: Mapping[str, Iterable[str]],
                 remote: Iterable[str] = ()):
        remote = set(remote)
        by_name = {v.op.name: v for v in variables}
        graph = next(iter(by_name.values())).graph
        self.groups = {g: tuple(sorted(set(names))) for g, names in groups.items()}
        wanted = sorted({n for names in self.groups.values() for n in names})
        self._take: dict[str, tf.Operation] = {}
        self._fetch: dict[str, tuple[dict[str, tf.Tensor], tf.Operation]] = {}
        with graph.as_default(), tf.name_scope("snapshot"):
            handles, assigns = {}, {}
            for name in wanted:
                v = by_name[name]
                if name in remote:  # read on its server: no byte leaves it
                    with tf.device(_server_host(v)):
                        value = v.read_value()
                else:
                    value = v.read_value()  # placed with the variable
                if v.op.type != "VarHandleOp":
                    # A reference variable is updated in place, not
                    # copy-on-write: the snapshot needs its own copy.
                    value = tf.raw_ops.DeepCopy(x=value)
                # Shadows live in host memory: on CPU that is the variable's
                # own buffer (copy-on-write), on GPU a device-to-host copy.
                with tf.device(_server_host(v) if name in remote else "/device:CPU:0"):
                    handles[name] = tf.raw_ops.VarHandleOp(
                        dtype=v.dtype.base_dtype, shape=v.shape,
                        container=_CONTAINER, shared_name=name)
                    assigns[name] = tf.raw_ops.AssignVariableOp(
                        resource=handles[name], value=value)
            for group, names in self.groups.items():
                self._take[group] = tf.group(*(assigns[n] for n in names))
                names = [n for n in names if n not in remote]
                with tf.device("/device:CPU:0"):
                    reads = {n: tf.raw_ops.ReadVariableOp(
                        resource=handles[n], dtype=by_name[n].dtype.base_dtype)
                        for n in names}
                    with tf.control_dependencies(list(reads.values())):
                        release = tf.group(*(tf.raw_ops.DestroyResourceOp(
                            resource=handles[n], ignore_lookup_error=True)
                            for n in names))
                self._fetch[group] = (reads, release)

    def take(self, sess: tf.compat.v1.Session, group: str, options=None) -> None:
        """Snapshots the group's variables as they are now (between steps)."""
        sess.run(self._take[group], options=options)

    def fetch(self, sess: tf.compat.v1.Session, group: str,
              options=None) -> dict[str, np.ndarray]:
        """The group's snapshot as numpy arrays; frees the shadows."""
        reads, release = self._fetch[group]
        return sess.run({"values": reads, "released": release},
                        options=options)["values"]


def _server_host(variable) -> str:
    """The CPU of the task (a parameter server) that holds ``variable``."""
    spec = tf.DeviceSpec.from_string(variable.device)
    return tf.DeviceSpec(job=spec.job, replica=spec.replica, task=spec.task,
                         device_type="CPU", device_index=0).to_string()
