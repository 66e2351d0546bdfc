"""Ray Data input: a ``ray.data.Dataset`` streamed to the workers.

The config names a function ``ray_dataset_fn(params)`` that returns the
dataset (e.g. ``ray.data.read_parquet(...)``); the driver calls it once. Each
worker group reads it as one ordered stream dealt to the workers in chunks
(:mod:`distributed.inputs.raystream`); every column but ``label`` is a
feature, and list-valued columns (fixed-length lists, tensor columns) become
``[batch, ...]`` arrays. The batches enter the graph through a
:class:`~distributed.inputs.sources.PythonSource`, read ahead on a thread.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from distributed.errors import ConfigError, did_you_mean, user_code

FIELD = "input.ray_dataset"


def load_dataset(ref: str, label: str, params: Mapping[str, Any],
                 field: str = "input"):
    """Calls the config's dataset function in the driver and checks what it
    returns: a ``ray.data.Dataset`` with the ``label`` column and at least one
    feature column.

    Args:
        ref, label, params: The config's ``ray_dataset``, ``label`` and params.
        field: The config field the input is (``input``, ``eval.input``), for
            the error messages.

    NOTE: only the driver calls this, after Ray is up.
    """
    import ray.data

    from distributed.model import load_function
    quiet()
    where = f"{field}.ray_dataset"
    fn = load_function(ref, where, 1)
    with user_code(where, ref):
        dataset = fn(dict(params))
    if not isinstance(dataset, ray.data.Dataset):
        raise ConfigError(
            f"{where}: {ref} returned {type(dataset).__name__}, not a "
            "ray.data.Dataset; return e.g. ray.data.read_parquet(path)")
    with user_code(where, ref):
        schema = dataset.schema()
    if schema is None or not list(schema.names):
        raise ConfigError(f"{where}: {ref} returned an empty dataset (no rows, no "
                          "columns); check the path or query it reads")
    names = list(schema.names)
    if label not in names:
        hint = did_you_mean(label, names).rstrip()
        raise ConfigError(
            f"{field}.label: the dataset of {ref} has no column {label!r}"
            + (f" ({hint})" if hint else "")
            + f"; its columns are {', '.join(names)}")
    if len(names) < 2:
        raise ConfigError(f"{field}.label: {label!r} is the only column of the dataset "
                          f"of {ref}; the other columns are the features")
    return dataset


def check_cpus(dataset, free_cpus: float, ref: str) -> None:
    """A dataset that reads or maps each epoch runs Ray tasks (1 CPU each by
    default) next to the actors; with less than a CPU left they never start
    and the first step waits forever."""
    from ray.data.dataset import MaterializedDataset
    if free_cpus < 1 and not isinstance(dataset, MaterializedDataset):
        raise ConfigError(
            f"cpus_per_worker: the actors leave {free_cpus:g} of the cluster's CPUs "
            f"free, but the dataset of {ref} reads its files each epoch in Ray tasks "
            "that need 1 CPU; lower cpus_per_worker, add CPUs, or return "
            "dataset.materialize() when the data fits in the object store")


def quiet() -> None:
    """No progress bars or per-execution banners in the job's output (the
    splits' executor takes the driver's context)."""
    import logging
    import os

    import ray.data
    logging.getLogger("ray.data").setLevel(os.environ.get("RAY_DATA_LOG_LEVEL",
                                                          "WARNING"))
    # ... and not the warning that says the bars are off.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def epoch_batches(data, batch_size: int, label: str, ref: str, drop_last: bool,
                  prefetch: int = 2) -> Iterator:
    """One pass over ``data`` (a dataset or a split) as ``(features, labels)``
    numpy batches: every column but ``label`` is a feature."""
    for batch in data.iter_batches(batch_size=batch_size, batch_format="numpy",
                                   drop_last=drop_last, prefetch_batches=prefetch):
        batch = dict(batch)
        labels = column(batch.pop(label), label, ref)
        yield {k: column(v, k, ref) for k, v in batch.items()}, labels


def column(values: np.ndarray, name: str, ref: str) -> np.ndarray:
    """A column as one array: lists of equal length are stacked to [batch, ...]."""
    if values.dtype != object or not len(values) or \
            isinstance(values[0], (str, bytes)):
        return values
    try:
        return np.stack([np.asarray(v) for v in values])
    except ValueError:
        raise ConfigError(
            f"{FIELD}: column {name!r} of {ref}'s dataset holds lists of different "
            "lengths; pad them to one length (or drop the column)") from None
