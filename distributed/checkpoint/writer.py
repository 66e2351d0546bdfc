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
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import tensorflow as tf
from tensorflow.python.training.saving import saveable_object

from distributed.checkpoint import sharding
from distributed.checkpoint.layout import CKPT_PREFIX
from distributed.checkpoint.manifest import TensorRecord
from distributed.checkpoint.selection import VariableInfo, describe_variables
from distributed.checkpoint.tf_index import read_index


class _ShardSaveable(saveable_object.SaveableObject):
    """Saves one variable under ``name``, in the shard named by ``device``."""

    def __init__(self, variable, device: str, name: str):
        self._variable = variable
        spec = saveable_object.SaveSpec(
            variable.value, "", name, dtype=variable.dtype.base_dtype, device=device)
        super().__init__(variable, [spec], name)

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
class WrittenCheckpoint:
    """What :meth:`CheckpointWriter.write` produced in a directory."""

    prefix: str
    files: tuple[str, ...]
    records: tuple[TensorRecord, ...]


class CheckpointWriter:
    """A sharded Saver over a fixed set of variables of one graph.

    Args:
        variables: The selected ``tf.Variable`` objects (one graph), saved
            under their op names; or ``{checkpoint_name: variable}``, saving
            each variable's value under the given name. A name's manifest
            ``trainable`` is that of the graph's variable of that name.
        num_shards: Number of ``.data`` files; default from the total bytes
            (one per 256 MiB, at most 16, at most one per variable).
        save_meta_graph: Also write ``model.ckpt.meta`` (large; off by default).
    """

    def __init__(self, variables: Sequence[tf.Variable] | Mapping[str, tf.Variable],
                 num_shards: int | None = None, save_meta_graph: bool = False):
        by_name = (dict(variables) if isinstance(variables, Mapping)
                   else {v.op.name: v for v in variables})
        if not by_name:
            raise ValueError("CheckpointWriter needs at least one variable")
        variables = list(by_name.values())
        self.graph = variables[0].graph
        trainable = {v.op.name for v in self.graph.get_collection("trainable_variables")}
        self.infos: list[VariableInfo] = [
            dataclasses.replace(info, name=name, trainable=name in trainable)
            for name, info in zip(by_name, describe_variables(variables))]
        sizes = {i.name: _nbytes(i) for i in self.infos}
        if num_shards is None:
            num_shards = sharding.default_num_shards(sum(sizes.values()), len(sizes))
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"shards must be a positive integer, got {num_shards!r}")
        self.assignment = sharding.assign_shards(sizes, num_shards)
        self.num_shards = len(set(self.assignment.values()))
        self.save_meta_graph = save_meta_graph
        with self.graph.as_default(), tf.name_scope("sharded_checkpoint"):
            saveables = [
                _ShardSaveable(v, f"/device:CPU:{self.assignment[name]}", name)
                for name, v in by_name.items()]
            self.saver = tf.compat.v1.train.Saver(
                var_list=saveables, sharded=True, max_to_keep=None,
                save_relative_paths=True, allow_empty=False)

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(i) for i in self.infos)

    def write(self, sess: tf.compat.v1.Session, directory: str) -> WrittenCheckpoint:
        """Saves the variables' current values into ``directory/model.ckpt.*``.

        Returns the files written and one manifest record per tensor, with
        offsets, lengths and CRC-32C taken from TensorFlow's own ``.index``.
        """
        prefix = os.path.join(directory, CKPT_PREFIX)
        with self.graph.as_default():
            self.saver.save(sess, prefix, write_meta_graph=self.save_meta_graph,
                            write_state=False)
        entries = read_index(prefix + ".index")
        trainable = {i.name: i.trainable for i in self.infos}
        num_files = max(e.shard_id for e in entries.values()) + 1
        records = tuple(
            TensorRecord(
                name=e.name,
                dtype=tf.dtypes.as_dtype(e.dtype).name,
                shape=e.shape,
                trainable=trainable.get(e.name, False),
                shard=f"{CKPT_PREFIX}.data-{e.shard_id:05d}-of-{num_files:05d}",
                offset=e.offset,
                length=e.size,
                crc32c=e.crc32c,
            ) for e in entries.values())
        files = tuple(sorted(os.listdir(directory)))
        return WrittenCheckpoint(prefix=prefix, files=files, records=records)


def _nbytes(info: VariableInfo) -> int:
    size = tf.dtypes.as_dtype(info.dtype).size
    n = 1
    for d in info.shape:
        n *= max(int(d), 0)
    return size * n
