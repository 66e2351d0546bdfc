"""Ray Data inputs for tests/test_raydata.py, importable by the driver and by
Ray workers (``tests.helpers.raydata_inputs:...`` in a config's ``input.ray_dataset``).

Every dataset function takes ``params`` (the config's ``input_params``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Mapping

import numpy as np

from distributed.train.worker import Worker


def parquet_dataset(params: Mapping[str, Any]):
    """``ray.data.read_parquet(params["path"])``.

    ``params``: ``path``; ``materialize`` (bool): return ``.materialize()``;
    ``pin_to_driver`` (bool): run the read tasks on the driver's node only
    (so the blocks of a materialized dataset live there, and no read task
    needs a CPU on another node).
    """
    import ray
    import ray.data
    kwargs = {}
    if params.get("pin_to_driver"):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        kwargs["ray_remote_args"] = {"scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)}
    dataset = ray.data.read_parquet(params["path"], **kwargs)
    return dataset.materialize() if params.get("materialize") else dataset


def empty_dataset(params: Mapping[str, Any]):
    """A dataset with no rows and no columns."""
    import ray.data
    return ray.data.from_items([])


def rows_as_list(params: Mapping[str, Any]):
    """A list of rows: what a user might return instead of a Dataset."""
    return [{"image": [0.0] * 64, "label": 0}, {"image": [1.0] * 64, "label": 1}]


def write_ragged_parquet(path: str, rows: int = 256) -> str:
    """One Parquet file whose ``image`` list column has a different length in
    every other row (so every batch mixes lengths) and an int64 ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(path, exist_ok=True)
    lengths = [64 if i % 2 == 0 else 63 for i in range(rows)]
    image = pa.array([np.full(n, 0.5, np.float32).tolist() for n in lengths],
                     pa.list_(pa.float32()))
    table = pa.table({"image": image, "label": pa.array(np.arange(rows) % 10)})
    pq.write_table(table, os.path.join(path, "part-00000.parquet"))
    return path


def write_zero_row_parquet(path: str) -> str:
    """One Parquet file with the digits' columns and no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(path, exist_ok=True)
    table = pa.table({"image": pa.array([], pa.list_(pa.float32(), 64)),
                      "label": pa.array([], pa.int64())})
    pq.write_table(table, os.path.join(path, "part-00000.parquet"))
    return path


NODES_DIR = "worker_nodes"


def worker_nodes_dir(storage_path: str) -> str:
    """Where :class:`NodeRecordingWorker` records its nodes."""
    return os.path.join(storage_path, NODES_DIR)


class NodeRecordingWorker(Worker):
    """A worker that records, once set up, its rank, pid and Ray node id as one
    file ``<storage>/worker_nodes/<time_ns>-<uuid>.json`` (one file per setup,
    so every group's placement is kept; order by name = order of setup)."""

    def setup(self, *args, **kwargs):
        import json
        import time

        import ray
        result = super().setup(*args, **kwargs)
        directory = worker_nodes_dir(self.config.storage_path)
        os.makedirs(directory, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        record = {"rank": self.rank, "pid": os.getpid(),
                  "node_id": ray.get_runtime_context().get_node_id()}
        tmp = os.path.join(directory, "." + name)
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(directory, name))
        return result


def read_worker_nodes(storage_path: str) -> list[dict]:
    """Every record :class:`NodeRecordingWorker` wrote, in setup order."""
    import json
    directory = worker_nodes_dir(storage_path)
    records = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        if name.startswith("."):
            continue
        with open(os.path.join(directory, name)) as f:
            records.append(json.load(f))
    return records


def ids_dataset(params: Mapping[str, Any]):
    """Rows ``0..rows-1`` in order (``params["rows"]``), in ``blocks`` blocks:
    an ``id`` feature (the row's index) and a ``label`` (``id % 3``);
    ``shuffle``: then shuffled without a seed."""
    import ray.data
    rows = int(params.get("rows", 6000))
    dataset = ray.data.range(rows, override_num_blocks=int(params.get("blocks", 7))) \
        .map_batches(lambda b: {"id": b["id"], "label": b["id"] % 3})
    return dataset.random_shuffle() if params.get("shuffle") else dataset

