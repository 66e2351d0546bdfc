"""An input-heavy image workload: 32x32x3 records, decoded and augmented per step.

The records are the bundled digits made to look like small colour photos
(:func:`make_records`): each 8x8 digit is upscaled to 32x32, tinted into 3
channels, shifted and given noise, so every record differs. They are written
as TFRecord files of ``tf.train.Example`` (:func:`write_tfrecords`; features
``image``: the 3072 raw uint8 bytes, ``label``: int64) and as Parquet files
(:func:`write_parquet`; columns ``image``: the same bytes, ``label``).

Every input decodes the bytes, pads 4 pixels and randomly crops 32x32, flips
left-right at random and scales to float32 in [0, 1] (CIFAR-style
augmentation), and yields ``({"image": float32 [B, 32, 32, 3]}, int64 [B])``:

* :func:`image_generator_input_fn`: a Python generator reading the TFRecord
  files, decoding and augmenting in numpy (the pre-``tf.data`` way).
* :func:`image_dataset_input_fn`: the same as a ``tf.data`` pipeline inside the
  worker's graph (per-record map; :func:`image_dataset_vectorized_input_fn`
  maps whole batches).
* :func:`image_ray_dataset`: a Ray Data dataset (``read_parquet`` +
  ``map_batches`` in numpy), for ``input: {ray_dataset: ..., label: label}``.

:func:`small_cnn_model_fn` is the model all three feed (``scripts/bench_input.py``).
Worker ``i`` of ``n`` reads records ``i::n`` of the files taken in order, in
every input.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Iterator, Mapping

import numpy as np

# Nothing here imports TensorFlow at import time (distributed.examples.digits
# does): Ray Data's map tasks import this module for _decode_augment_batch.
IMAGE_KEY = "image"
LABEL = "label"
SIZE = 32
CHANNELS = 3
PAD = 4
RECORD_BYTES = SIZE * SIZE * CHANNELS

# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


def make_records(copies: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` x 1500 distinct 32x32x3 uint8 images from the digits' train split.

    Each copy of each digit is upscaled 4x (bilinear-ish: nearest, then a 2x2
    box blur), tinted per channel, shifted by up to 3 pixels and given
    Gaussian noise, all drawn per record.

    Returns:
        ``(uint8 [N, 32, 32, 3], int64 [N])`` with ``N = copies * 1500``.
    """
    from distributed.examples.digits import digits_eval_arrays
    features, labels = digits_eval_arrays("train")
    base = features[IMAGE_KEY].reshape(-1, 8, 8)
    up = base.repeat(4, axis=1).repeat(4, axis=2)  # [n, 32, 32]
    up = 0.25 * (up + np.roll(up, 1, 1) + np.roll(up, 1, 2) + np.roll(up, (1, 1), (1, 2)))
    up = up[..., None].astype(np.float32)
    rng = np.random.default_rng(seed)
    n = len(up)
    images, out_labels = [], []
    for _ in range(copies):
        tint = rng.uniform(0.4, 1.0, size=(n, 1, 1, CHANNELS)).astype(np.float32)
        background = rng.uniform(0.0, 0.3, size=(n, 1, 1, CHANNELS)).astype(np.float32)
        x = background + (1 - background) * up * tint
        x += rng.standard_normal(size=x.shape, dtype=np.float32) * np.float32(0.05)
        shifts = rng.integers(-3, 4, size=(n, 2))
        for dy, dx in np.unique(shifts, axis=0):
            rows = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            x[rows] = np.roll(x[rows], (dy, dx), (1, 2))
        np.clip(x * np.float32(255), 0, 255, out=x)
        images.append(np.rint(x).astype(np.uint8))
        out_labels.append(labels)
    return np.concatenate(images), np.concatenate(out_labels).astype(np.int64)


def _atomic_dir(path: str):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    return tmp


def _publish(tmp: str, path: str) -> None:
    try:
        os.rename(tmp, path)
    except OSError:  # another writer was first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def _file_rows(n: int, files: int) -> list[np.ndarray]:
    """Consecutive row ranges per file, so the files in order hold rows 0..n-1."""
    return np.array_split(np.arange(n), files)


def write_tfrecords(path: str, images: np.ndarray, labels: np.ndarray,
                    files: int = 4) -> list[str]:
    """Writes ``tf.train.Example`` records (``image`` bytes, ``label``) as
    ``files`` TFRecord files under ``path``; returns the files in order."""
    import tensorflow as tf
    tmp = _atomic_dir(path)
    for i, rows in enumerate(_file_rows(len(labels), files)):
        with tf.io.TFRecordWriter(os.path.join(tmp, f"part-{i:05d}.tfrecord")) as w:
            for r in rows:
                ex = tf.train.Example(features=tf.train.Features(feature={
                    IMAGE_KEY: tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[images[r].tobytes()])),
                    LABEL: tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[int(labels[r])]))}))
                w.write(ex.SerializeToString())
    _publish(tmp, path)
    return tfrecord_files(path)


def write_parquet(path: str, images: np.ndarray, labels: np.ndarray,
                  files: int = 4) -> str:
    """Writes the same records as ``files`` Parquet files (``image``: binary,
    ``label``: int64) under ``path``; returns ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = _atomic_dir(path)
    for i, rows in enumerate(_file_rows(len(labels), files)):
        table = pa.table({
            IMAGE_KEY: pa.array([images[r].tobytes() for r in rows], type=pa.binary()),
            LABEL: pa.array(labels[rows], type=pa.int64())})
        pq.write_table(table, os.path.join(tmp, f"part-{i:05d}.parquet"))
    _publish(tmp, path)
    return path


def tfrecord_files(path: str) -> list[str]:
    """The ``*.tfrecord`` files under ``path``, in order."""
    if not os.path.isdir(path):
        raise ValueError(f"params.path: {path!r} is not a directory of TFRecord files; "
                         "write them with distributed.examples.images.write_tfrecords")
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.endswith(".tfrecord"))
    if not files:
        raise ValueError(f"params.path: no .tfrecord files under {path!r}")
    return files


# ---------------------------------------------------------------------------
# Augmentation in numpy (generator and Ray Data inputs)
# ---------------------------------------------------------------------------


def augment_numpy(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pad 4, random 32x32 crop, random left-right flip, scale to [0, 1].

    Args:
        images: uint8 ``[B, 32, 32, 3]``.

    Returns:
        float32 ``[B, 32, 32, 3]``.
    """
    n = len(images)
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    offsets = rng.integers(0, 2 * PAD + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    out = np.empty((n, SIZE, SIZE, CHANNELS), np.uint8)
    for i in range(n):
        y, x = offsets[i]
        crop = padded[i, y:y + SIZE, x:x + SIZE]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out.astype(np.float32) * np.float32(1 / 255)


def decode_numpy(blobs) -> np.ndarray:
    """Raw image bytes (a sequence of ``bytes``) as uint8 ``[B, 32, 32, 3]``."""
    return np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, SIZE, SIZE, CHANNELS)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _shard_records(files: list[str], worker_index: int,
                   num_workers: int) -> Iterator[bytes]:
    """This worker's serialized records (``i::n`` of the files in order), one
    epoch after another."""
    import tensorflow as tf
    while True:
        n = 0
        for path in files:
            for record in tf.compat.v1.io.tf_record_iterator(path):
                if n % num_workers == worker_index:
                    yield record
                n += 1


def image_generator_input_fn(worker_index: int, num_workers: int, batch_size: int,
                             params: Mapping[str, Any]) -> Iterator:
    """Yields this worker's augmented batches forever, read from TFRecord files
    in Python: each record is parsed (``tf.train.Example.FromString``), its
    bytes decoded with numpy, and each batch cropped and flipped in numpy.

    Args:
        params: ``"path"`` (directory of ``.tfrecord`` files, required),
            ``"seed"`` (default 0).
    """
    from distributed.examples.digits import _check_shard_args
    _check_shard_args(worker_index, num_workers, batch_size)
    params = params or {}
    files = tfrecord_files(params.get("path", ""))
    rng = np.random.default_rng([int(params.get("seed", 0)), int(worker_index)])

    def batches():
        from tensorflow.core.example.example_pb2 import Example
        records = _shard_records(files, worker_index, num_workers)
        while True:
            blobs, labels = [], np.empty(batch_size, np.int64)
            for i in range(batch_size):
                feature = Example.FromString(next(records)).features.feature
                blobs.append(feature[IMAGE_KEY].bytes_list.value[0])
                labels[i] = feature[LABEL].int64_list.value[0]
            yield {IMAGE_KEY: augment_numpy(decode_numpy(blobs), rng)}, labels

    return batches()


def _tfrecord_input(worker_index: int, num_workers: int, batch_size: int,
                    params: Mapping[str, Any]):
    """The TFRecord inputs' shared part: checked arguments, this run's files,
    the worker's augmentation seed and the record's feature spec."""
    import tensorflow as tf

    from distributed.examples.digits import _check_shard_args
    _check_shard_args(worker_index, num_workers, batch_size)
    params = params or {}
    files = tfrecord_files(params.get("path", ""))
    seed = int(params.get("seed", 0)) * 1000 + int(worker_index) + 1
    spec = {IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
            LABEL: tf.io.FixedLenFeature([], tf.int64)}
    return files, seed, spec


def image_dataset_input_fn(worker_index: int, num_workers: int, batch_size: int,
                           params: Mapping[str, Any]):
    """The same records and augmentation as a ``tf.data`` pipeline:
    ``TFRecordDataset(files).shard(n, i).map(parse, decode, crop, flip,
    num_parallel_calls=AUTOTUNE).repeat().batch(B, drop_remainder=True)``
    (the framework adds the prefetch).

    Args:
        params: ``"path"`` (directory of ``.tfrecord`` files, required),
            ``"seed"`` (default 0).
    """
    import tensorflow as tf

    files, seed, spec = _tfrecord_input(worker_index, num_workers, batch_size, params)

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        image = tf.reshape(tf.io.decode_raw(example[IMAGE_KEY], tf.uint8),
                           [SIZE, SIZE, CHANNELS])
        image = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
        image = tf.image.random_crop(image, [SIZE, SIZE, CHANNELS], seed=seed)
        image = tf.image.random_flip_left_right(image, seed=seed)
        image = tf.image.convert_image_dtype(image, tf.float32)  # / 255
        return {IMAGE_KEY: image}, example[LABEL]

    return (tf.data.TFRecordDataset(files)
            .shard(num_workers, worker_index)
            .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
            .repeat()
            .batch(batch_size, drop_remainder=True))


def image_dataset_vectorized_input_fn(worker_index: int, num_workers: int,
                                      batch_size: int, params: Mapping[str, Any]):
    """:func:`image_dataset_input_fn` with the map vectorized (the tf.data
    performance guide's advice for cheap per-element work): ``batch`` first,
    then one ``map`` per batch (``parse_example``, per-row crop offsets by
    ``gather``, flips by ``where``). Same records, shards and augmentation.
    """
    import tensorflow as tf

    files, seed, spec = _tfrecord_input(worker_index, num_workers, batch_size, params)

    def parse(records):
        example = tf.io.parse_example(records, spec)
        images = tf.reshape(tf.io.decode_raw(example[IMAGE_KEY], tf.uint8),
                            [-1, SIZE, SIZE, CHANNELS])
        images = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
        n = tf.shape(images)[0]
        offsets = tf.random.uniform([n, 2], 0, 2 * PAD + 1, tf.int32, seed=seed)
        grid = tf.range(SIZE)
        images = tf.gather(images, offsets[:, :1] + grid, axis=1, batch_dims=1)
        images = tf.gather(images, offsets[:, 1:] + grid, axis=2, batch_dims=1)
        flips = tf.random.uniform([n], seed=seed + 1) < 0.5
        images = tf.where(flips[:, None, None, None], tf.reverse(images, [2]), images)
        return {IMAGE_KEY: tf.image.convert_image_dtype(images, tf.float32)}, \
            example[LABEL]

    return (tf.data.TFRecordDataset(files)
            .shard(num_workers, worker_index)
            .repeat()
            .batch(batch_size, drop_remainder=True)
            .map(parse, num_parallel_calls=tf.data.AUTOTUNE))


def _decode_augment_batch(batch: dict) -> dict:
    """Ray Data ``map_batches`` function: bytes -> augmented float32 images."""
    rng = np.random.default_rng()
    return {IMAGE_KEY: augment_numpy(decode_numpy(batch[IMAGE_KEY]), rng),
            LABEL: np.asarray(batch[LABEL], np.int64)}


def image_ray_dataset(params: Mapping[str, Any]):
    """The records as a Ray Data dataset: ``read_parquet(path)`` then
    ``map_batches`` (decode, crop, flip in numpy).

    The map is not materialized: it runs again every epoch and draws new
    crops and flips. By default the read is (``.materialize()`` before the
    map, the records' raw bytes, a few dozen MB): otherwise every epoch lists
    and reads the files again in Ray tasks before its first batch.

    Args:
        params: ``"path"`` (directory of Parquet files, required), ``"cache"``
            (materialize the read, default true), ``"map_batch_size"`` (rows
            per ``map_batches`` call, default 256).
    """
    import ray.data
    params = params or {}
    path = params.get("path", "")
    if not os.path.isdir(path):
        raise ValueError(f"params.path: {path!r} is not a directory of Parquet files; "
                         "write them with distributed.examples.images.write_parquet")
    ds = ray.data.read_parquet(path)
    if params.get("cache", True):
        ds = ds.materialize()
    return ds.map_batches(_decode_augment_batch, batch_format="numpy",
                          batch_size=int(params.get("map_batch_size", 256)))


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def small_cnn_model_fn(features: Mapping[str, Any], labels: Any, mode: str,
                       params: Mapping[str, Any]):
    """A small convnet for 32x32x3 images, in variable scope ``small_cnn``.

    ``conv_<i>``: 3x3 convolution with stride 2 (SAME), bias, ReLU, per entry
    of ``filters``; then global average pooling and a dense ``logits`` layer.

    Args:
        features: ``{"image": float [B, 32, 32, 3]}``.
        params: ``"filters"`` (default ``[16, 32]``), ``"num_classes"``
            (default 10), ``"seed"`` (default 0).
    """
    import tensorflow as tf

    from distributed.examples.digits import _dense, _glorot, _head
    from distributed.model import check_mode
    check_mode(mode, labels)
    params = params or {}
    seed = int(params.get("seed", 0))
    x = tf.cast(features[IMAGE_KEY], tf.float32)
    with tf.compat.v1.variable_scope("small_cnn", reuse=tf.compat.v1.AUTO_REUSE):
        for i, filters in enumerate(params.get("filters", [16, 32])):
            with tf.compat.v1.variable_scope(f"conv_{i}"):
                kernel = tf.compat.v1.get_variable(
                    "kernel", [3, 3, int(x.shape[-1]), int(filters)],
                    initializer=_glorot(seed + i))
                bias = tf.compat.v1.get_variable(
                    "bias", [int(filters)], initializer=tf.compat.v1.zeros_initializer())
                x = tf.nn.relu(tf.nn.bias_add(
                    tf.nn.conv2d(x, kernel, strides=2, padding="SAME"), bias))
        x = tf.reduce_mean(x, axis=[1, 2])
        logits = _dense(x, int(params.get("num_classes", 10)), "logits", seed + 1000)
    return _head(logits, labels, mode)


__all__ = ["augment_numpy", "decode_numpy", "image_dataset_input_fn",
           "image_dataset_vectorized_input_fn",
           "image_generator_input_fn", "image_ray_dataset", "make_records",
           "small_cnn_model_fn", "tfrecord_files", "write_parquet", "write_tfrecords"]
