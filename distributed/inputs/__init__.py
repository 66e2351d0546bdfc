"""The user's input, of any kind, as the tensors a graph's model reads.

Three kinds, named by the config's ``input``:

* ``"package.module:input_fn"`` returning a ``tf.data.Dataset`` of
  ``(features dict, labels)`` batches: built inside each worker's graph
  (:class:`DatasetSource`), nothing fed from Python.
* ``"package.module:input_fn"`` yielding ``(features dict, labels)`` numpy
  batches: read on a background thread a few batches ahead
  (:class:`PythonSource`).
* ``{ray_dataset: "package.module:fn", label: COLUMN}``: a Ray Data dataset,
  read as one ordered stream dealt to the workers in chunks
  (:mod:`distributed.inputs.raydata`, :mod:`distributed.inputs.raystream`).

Every kind yields the same :class:`InputSpec`, so the coordinator, the predict
graph and the restore job see the same inputs whatever the training read.
"""

from __future__ import annotations

from typing import Any

from distributed.errors import ConfigError, user_code
from distributed.inputs import raydata
from distributed.inputs.sources import (DatasetSource, PythonSource, call_input_fn,
                                        is_dataset, takes_start_batch)
from distributed.inputs.spec import InputSpec


def open_source(config, rank: int, split: Any = None, gpu: bool = False):
    """This worker's input source, built in the current default graph.

    Args:
        config: The run's :class:`~distributed.config.TrainConfig`.
        rank: The worker's index.
        split: Ray Data input only: the group's
            :class:`~distributed.inputs.raystream.Feeder` actor.
        gpu: Whether the model runs on a GPU (``tf.data`` prefetches there).
    """
    if config.ray_input:
        from distributed.inputs.raystream import RayDataSource
        return RayDataSource(split, config, rank)
    from distributed.model import load_function
    input_fn = load_function(config.input_ref, "input", 4)
    result = call_input_fn(input_fn, config.input_ref, rank, config.workers,
                           config.batch_size, config.input_params)
    if is_dataset(result):
        return DatasetSource(result, config.input_ref, rank, gpu=gpu,
                             saves_position=config.saves_input_position)
    def reopen(batch: int):
        return call_input_fn(input_fn, config.input_ref, rank, config.workers,
                             config.batch_size, config.input_params, start_batch=batch)
    return PythonSource(result, config.input_ref, "input", rank,
                        prefetch=config.input_prefetch,
                        reopen=reopen if takes_start_batch(input_fn) else None)


def probe_spec(config) -> InputSpec:
    """The input spec of worker 0's input, in a throwaway graph (for the
    coordinator, which builds placeholders and never reads the input).

    A ``tf.data`` input is only built, not read; a dataset known to hold fewer
    batches than the run's steps fails here, before anything is written.
    """
    import tensorflow as tf

    from distributed.model import load_function
    ref = config.input_ref
    input_fn = load_function(ref, "input", 4)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(config.seed)
        result = call_input_fn(input_fn, ref, 0, config.workers, config.batch_size,
                               config.input_params)
        if not is_dataset(result):
            source = PythonSource(result, ref, "input", 0, prefetch=0)
            source.close()
            return source.spec
        spec = InputSpec.from_element_spec(result.element_spec, f"input {ref}")
        with user_code("input", ref), tf.compat.v1.Session(graph=graph) as sess:
            batches = int(sess.run(result.cardinality()))
    if 0 <= batches < config.steps:
        raise ConfigError(
            f"input: the tf.data dataset of {ref} holds {batches} batch(es) on worker "
            f"0 but the run has {config.steps} steps; add .repeat() before "
            ".batch() in input_fn (or lower steps)")
    return spec


__all__ = ["DatasetSource", "InputSpec", "PythonSource", "open_source", "probe_spec",
           "raydata"]
