"""The digits as the other kinds of input: a ``tf.data`` pipeline and Ray Data.

* :func:`digits_dataset_input_fn` returns a ``tf.data.Dataset`` built inside
  each worker's graph (``jobs/configs/digits_tfdata.yaml``).
* :func:`digits_ray_dataset` returns a ``ray.data.Dataset`` read from Parquet
  files it writes from the bundled digits at first use
  (``jobs/configs/digits_raydata.yaml``).

Both read the same examples as :func:`distributed.examples.digits.digits_input_fn`
and feed the same models.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, Mapping

import numpy as np

from distributed.examples.digits import IMAGE_KEY, _check_shard_args, digits_eval_arrays

DEFAULT_PARQUET_DIR = os.path.join(tempfile.gettempdir(), "dtr-digits-parquet")
LABEL = "label"


def digits_dataset_input_fn(worker_index: int, num_workers: int, batch_size: int,
                            params: Mapping[str, Any]):
    """This worker's shard of the digits as a ``tf.data`` pipeline.

    The usual Estimator-era pipeline: ``from_tensor_slices`` then
    ``shard(num_workers, worker_index)``, ``shuffle`` (reshuffled each epoch),
    ``repeat()`` and ``batch``. No ``prefetch``: the framework adds one.

    Args:
        params: ``"split"`` (``"train"``, default, or ``"test"``) and ``"seed"``.

    Returns:
        A dataset of ``({"image": float32 [B, 64]}, int64 [B])`` batches.
    """
    import tensorflow as tf
    _check_shard_args(worker_index, num_workers, batch_size)
    params = params or {}
    features, labels = digits_eval_arrays(params.get("split", "train"))
    seed = int(params.get("seed", 0))
    return (tf.data.Dataset.from_tensor_slices((features, labels))
            .shard(num_workers, worker_index)
            .shuffle(len(labels), seed=seed + worker_index, reshuffle_each_iteration=True)
            .repeat()
            .batch(batch_size, drop_remainder=True))


def digits_ray_dataset(params: Mapping[str, Any]):
    """The digits as a Ray Data dataset read from Parquet.

    The files are written at first use (``params["path"]``, default
    ``<tmp>/dtr-digits-parquet/<split>``), atomically, so concurrent first
    runs agree. Columns: ``image`` (64 float32 pixels, a fixed-length list)
    and ``label`` (int64). The dataset is small, so it is materialized: each
    epoch streams it from the object store instead of re-reading the files.

    Args:
        params: ``"split"`` (``"train"``, default, or ``"test"``), ``"path"``,
            ``"files"`` (Parquet files to write, default 4).
    """
    import ray.data
    params = params or {}
    split = params.get("split", "train")
    path = params.get("path") or os.path.join(DEFAULT_PARQUET_DIR, split)
    if not os.path.isdir(path):
        write_digits_parquet(path, split, int(params.get("files", 4)))
    return ray.data.read_parquet(path).materialize()


def write_digits_parquet(path: str, split: str = "train", files: int = 4) -> str:
    """Writes one split of the digits as ``files`` Parquet files under ``path``
    (written in a temp directory, then renamed into place)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    features, labels = digits_eval_arrays(split)
    images = features[IMAGE_KEY].astype(np.float32)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    for i, rows in enumerate(np.array_split(np.arange(len(labels)), files)):
        image = pa.FixedSizeListArray.from_arrays(
            pa.array(images[rows].reshape(-1)), images.shape[1])
        table = pa.table({IMAGE_KEY: image, LABEL: pa.array(labels[rows])})
        pq.write_table(table, os.path.join(tmp, f"part-{i:05d}.parquet"))
    try:
        os.rename(tmp, path)
    except OSError:  # another run wrote it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return path


__all__ = ["digits_dataset_input_fn", "digits_ray_dataset", "write_digits_parquet"]
