"""Writes a sharded TF V2 checkpoint of selected variables with a stock ``Saver``.

The writer builds, once per graph, a ``tf.compat.v1.train.Saver(sharded=True)``
over the selected variables. ``Saver`` writes one ``.data`` shard per device
group and runs one ``SaveV2`` op per shard; the ops are independent, so
TensorFlow's executor writes the shards in parallel and ``MergeV2Checkpoints``
then merges one ``.index``. To get K balanced shards from variables that may all
live on one device, each selected variable is wrapped in a saveable whose device
is one of K virtual CPU device names, assigned by :func:`sharding.assign_shards`.
The tensor itself is read where the variable lives (no copy); the device name
only groups variables into shards.

The result is a plain TF V2 checkpoint keyed by variable op names (or by the
names a ``{checkpoint_name: variable}`` mapping gives, as ``Saver`` accepts:
``selection.serve_ema`` saves each moving average under its variable's name):
``tf.train.load_checkpoint`` and any ``Saver.restore`` read it with no code of ours.

Partitioned variables are saved as ``Saver`` saves them: each part's
``SaveSliceInfo`` makes it a slice of one logical tensor (``emb``, not
``emb/part_0``...), so any ``Saver`` restores the table into the same
partitioning, another one, or none, and ``load_checkpoint(...).get_tensor("emb")``
returns it whole. Each part is its own saveable, so the shards balance slices,
and a large table spreads over all of them. A mapping key that names a part
(``serve_ema``: ``{"emb/part_0": its average}``) saves the value as that
part's slice; a mapping value may also be a ``PartitionedVariable`` or a list
of parts, saved under the key as one logical tensor (as ``Saver`` does).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Mapping, Sequence

import tensorflow as tf
from tensorflow.python.ops.variables import PartitionedVariable  # no public alias
from tensorflow.python.training.saving import saveable_object

from distributed.checkpoint import sharding, slices
from distributed.checkpoint.layout import CKPT_PREFIX
from distributed.checkpoint.manifest import TensorRecord
from distributed.checkpoint.tf_index import read_index
from distributed.errors import SelectionError


class ShardImbalanceWarning(UserWarning):
    """One unpartitioned variable is too large for the shards to balance."""


class _ShardSaveable(saveable_object.SaveableObject):
    """Saves one variable (or one part, as a slice) under ``name``, in the shard
    named by ``device``; ``key`` only tells saveables apart."""

    def __init__(self, variable, device: str, key: str, name: str, slice_spec: str):
        self._variable = variable
        spec = saveable_object.SaveSpec(
            variable.value, slice_spec, name, dtype=variable.dtype.base_dtype,
            device=device)
        super().__init__(variable, [spec], key)

    def restore(self, restored_tensors, restored_shapes):
        del restored_shapes
        return self._variable.assign(restored_tensors[0], read_value=False)


def session_config(num_shards: int) -> tf.compat.v1.ConfigProto:
    """A Session config that lets ``num_shards`` ``SaveV2`` ops run at once.

    The chief Session should use it (or merge its fields): ``num_shards``
    virtual CPU devices (so the Saver's per-device restore ops can be placed)
    and enough inter-op threads for the shard writers to run in parallel.
    """
    return tf.compat.v1.ConfigProto(
        device_count={"CPU": max(1, num_shards)},
        inter_op_parallelism_threads=max(2, num_shards + 1),
        allow_soft_placement=True,
    )


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One saveable: a variable, or one part of a partitioned one."""

    key: str  # unique among the writer's entries
    variable: tf.Variable
    name: str  # the checkpoint's (logical) tensor name
    trainable: bool
    spec: str = ""  # SaveSliceInfo.spec ("" when unsliced)
    full_shape: tuple[int, ...] = ()
    extents: slices.Extents | None = None

    @property
    def nbytes(self) -> int:
        shape = self.variable.shape.as_list()  # None: sized per save, counted 0
        return self.variable.dtype.base_dtype.size * math.prod(max(d or 0, 0)
                                                               for d in shape)


def _entry(key: str, variable, name: str, trainable: bool, info) -> _Entry:
    """An entry, a slice of ``info.full_name``'s tensor when ``info`` is set."""
    if info is None:
        return _Entry(key, variable, name, trainable)
    return _Entry(key, variable, name, trainable, info.spec,
                  tuple(int(d) for d in info.full_shape),
                  tuple(zip(map(int, info.var_offset), map(int, info.var_shape))))


def _entries(variables) -> list[_Entry]:
    """The saveables of a list of variables (``PartitionedVariable`` allowed)
    or of a ``{checkpoint_name: variable, PartitionedVariable or parts}`` map."""
    items = (list(variables.items()) if isinstance(variables, Mapping) else
             [(part.op.name, part) for v in variables
              for part in (list(v) if isinstance(v, PartitionedVariable)
                           else [v])])
    if not items:
        raise ValueError("CheckpointWriter needs at least one variable")
    first = items[0][1]
    graph = (next(iter(first)) if isinstance(first, (list, tuple, PartitionedVariable))
             else first).graph
    in_graph = {v.op.name: v for v in graph.get_collection("variables")}
    trainable = {v.op.name for v in graph.get_collection("trainable_variables")}
    out = []
    for key, value in items:
        if isinstance(value, (list, tuple, PartitionedVariable)):
            for part in value:  # one logical tensor named ``key``, as Saver does
                info = part._save_slice_info  # pylint: disable=protected-access
                if info is None:
                    raise ValueError(f"CheckpointWriter: {key!r} lists "
                                     f"{part.op.name!r}, which is not a partition")
                out.append(_entry(f"{key}/{part.op.name}", part, key,
                                  part.op.name in trainable, info))
            continue
        named = in_graph.get(key, value if value.op.name == key else None)
        info = getattr(named, "_save_slice_info", None)
        out.append(_entry(key, value, info.full_name if info else key,
                          key in trainable, info))
    _check_layout(out)
    return out


def _check_layout(entries: list[_Entry]) -> None:
    """Refuses what a restore could not read back: two tensors under one name,
    a part of the wrong shape, or parts that leave a gap in their variable."""
    groups: dict[str, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(e.name, []).append(e)
    for name, group in groups.items():
        if len(group) == 1 and group[0].extents is None:
            continue
        if any(e.extents is None for e in group):
            raise ValueError(f"CheckpointWriter: {len(group)} variables would be "
                             f"saved under the one name {name!r}")
        for e in group:
            want = list(slices.slice_shape(e.extents))
            if e.variable.shape.as_list() != want or e.full_shape != group[0].full_shape:
                raise ValueError(
                    f"CheckpointWriter: {e.key!r} has shape "
                    f"{e.variable.shape.as_list()}, but its slice of {name!r} "
                    f"{list(e.full_shape)} is {want}")
        gap = slices.uncovered(group[0].full_shape, [e.extents for e in group])
        if gap:
            raise SelectionError(
                f"partitioned variable {name!r} {list(group[0].full_shape)} is "
                f"saved only in part: {gap}. Select all of its parts (selection "
                "regexes match the logical name, e.g. '^emb$' keeps every part)")


@dataclasses.dataclass(frozen=True)
class WrittenCheckpoint:
    """What :meth:`CheckpointWriter.write` produced in a directory."""

    prefix: str
    files: tuple[str, ...]
    records: tuple[TensorRecord, ...]


class CheckpointWriter:
    """A sharded Saver over a fixed set of variables of one graph.

    Args:
        variables: The selected ``tf.Variable`` objects (one graph), saved
            under their op names (parts of a partitioned variable as slices of
            its logical name); or ``{checkpoint_name: variable}``, saving each
            variable's value under the given name (see the module docstring
            for parts). A name's manifest ``trainable`` is that of the graph's
            variable of that name (of any of its parts).
        num_shards: Number of ``.data`` files; default from the total bytes
            (one per 256 MiB, at most 16, at most one per variable or part).
        save_meta_graph: Also write ``model.ckpt.meta`` (large; off by default).
        servers: Variable name -> parameter server task, for the variables
            that live on parameter servers: their tensors are not the
            Saver's; :attr:`server_entries` lists them and the callable given
            to :meth:`attach_servers` writes them (see :meth:`write`).

    Raises:
        SelectionError: The parts given of a partitioned variable leave a gap
            in it (the message names it and the missing indices).
        ValueError: Two variables under one name, or a part whose shape is
            not its slice's.
    """

    def __init__(self, variables: Sequence[tf.Variable] | Mapping[str, tf.Variable],
                 num_shards: int | None = None, save_meta_graph: bool = False,
                 servers: Mapping[str, int] | None = None):
        entries = _entries(variables)
        self.graph = entries[0].variable.graph
        self._trainable: dict[str, bool] = {}
        for e in entries:
            self._trainable[e.name] = self._trainable.get(e.name, False) or e.trainable
        servers = servers or {}
        # (checkpoint name, slice spec, variable name, server task, dtype)
        self.server_entries = [(e.name, e.spec, e.variable.op.name,
                                servers[e.variable.op.name], e.variable.dtype.base_dtype)
                               for e in entries if e.variable.op.name in servers]
        self.server_bytes = sum(e.nbytes for e in entries if e.variable.op.name in servers)
        self._write_servers = None
        entries = [e for e in entries if e.variable.op.name not in servers]
        sizes = {e.key: e.nbytes for e in entries}
        if num_shards is None:
            num_shards = sharding.default_num_shards(sum(sizes.values()), len(sizes))
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"shards must be a positive integer, got {num_shards!r}")
        self.assignment = sharding.assign_shards(sizes, num_shards)
        self.num_shards = len(set(self.assignment.values()))
        self.total_bytes = sum(sizes.values()) + self.server_bytes
        # Logical tensors (a partitioned variable's parts are one), as the
        # manifest and the catalog count them.
        self.num_tensors = len(self._trainable)
        _warn_oversized(entries, sizes, self.num_shards)
        self.save_meta_graph = save_meta_graph
        self.saver = None
        if not entries:  # every selected tensor is on the parameter servers
            return
        with self.graph.as_default(), tf.name_scope("sharded_checkpoint"):
            saveables = [
                _ShardSaveable(e.variable, f"/device:CPU:{self.assignment[e.key]}",
                               e.key, e.name, e.spec) for e in entries]
            self.saver = tf.compat.v1.train.Saver(
                var_list=saveables, sharded=True, max_to_keep=None,
                save_relative_paths=True, allow_empty=False)

    def attach_servers(self, write_servers) -> None:
        """``write_servers(directory)`` has the parameter servers write
        :attr:`server_entries` into ``directory``; returns their prefixes."""
        self._write_servers = write_servers

    def write(self, sess: tf.compat.v1.Session, directory: str) -> WrittenCheckpoint:
        """Saves the variables' current values into ``directory/model.ckpt.*``.

        Returns the files written and one manifest record per tensor, with
        offsets, lengths and CRC-32C taken from TensorFlow's own ``.index``.
        """
        prefix = os.path.join(directory, CKPT_PREFIX)
        if self.server_entries:
            self._write_with_servers(sess, directory, prefix)
        else:
            with self.graph.as_default():
                self.saver.save(sess, prefix, write_meta_graph=self.save_meta_graph,
                                write_state=False)
        entries = read_index(prefix + ".index")
        num_files = max(e.shard_id for e in entries) + 1
        records = tuple(
            TensorRecord(
                name=e.name,
                dtype=tf.dtypes.as_dtype(e.dtype).name,
                shape=e.shape,
                trainable=self._trainable.get(e.name, False),
                shard=f"{CKPT_PREFIX}.data-{e.shard_id:05d}-of-{num_files:05d}",
                offset=e.offset,
                length=e.size,
                crc32c=e.crc32c,
                slice=None if e.slice is None else slices.format_slice(e.slice),
            ) for e in entries)
        files = tuple(sorted(os.listdir(directory)))
        return WrittenCheckpoint(prefix=prefix, files=files, records=records)


    def _write_with_servers(self, sess, directory: str, prefix: str) -> None:
        """The parameter servers write their shard files while this process
        writes its own, into ``directory``; then one index over all of them
        (``MergeV2Checkpoints`` renames the shards to ``model.ckpt.data-*``,
        as a sharded ``Saver`` does with its own)."""
        import threading
        if self._write_servers is None:
            raise RuntimeError("CheckpointWriter: variables on parameter servers, but "
                               "no servers attached (attach_servers)")
        result: dict = {}

        def servers():
            try:
                result["prefixes"] = self._write_servers(directory)
            except BaseException as e:  # raised on the caller's thread
                result["error"] = e

        thread = threading.Thread(target=servers, daemon=True)
        thread.start()
        own = []
        if self.saver is not None:
            own = [os.path.join(directory, "coordinator")]
            with self.graph.as_default():
                self.saver.save(sess, own[0], write_meta_graph=False, write_state=False)
        thread.join()
        if "error" in result:
            raise result["error"]
        with tf.device("/device:CPU:0"):
            tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=own + result["prefixes"],
                                          destination_prefix=prefix,
                                          delete_old_dirs=False)


def _warn_oversized(entries: list[_Entry], sizes: Mapping[str, int],
                    num_shards: int) -> None:
    """Warns about unpartitioned variables that keep the shards from balancing
    (see :func:`sharding.oversized`), naming each, its size and the fix."""
    unsliced = {e.key for e in entries if e.extents is None}
    for key, nbytes in sharding.oversized(sizes, num_shards, unsliced):
        warnings.warn(
            f"variable {key!r} ({nbytes / 2**20:.0f} MiB) is not partitioned and "
            f"is over twice a balanced shard ({sum(sizes.values()) / num_shards / 2**20:.0f} "
            f"MiB of {num_shards}): its shard alone sets the save time. Partition "
            "it: tf.compat.v1.get_variable(..., partitioner=tf.compat.v1."
            f"fixed_size_partitioner({num_shards})) so each shard gets a part",
            ShardImbalanceWarning, stacklevel=3)
