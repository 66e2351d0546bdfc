"""The user's model contract: an Estimator-like ``model_fn`` and an ``input_fn``.

A model is named in the config as ``"package.module:function"``.

``model_fn(features, labels, mode, params) -> ModelSpec``
    Builds a ``tf.compat.v1`` graph (variable scopes, ``get_variable``, ``tf.nn``
    ops) in the current default graph. ``features`` is a dict of name -> tensor
    (an iterator's tensors, or placeholders made from the input spec), ``labels`` a
    tensor or ``None`` in predict mode, ``mode`` one of :data:`MODES`, ``params``
    the config's ``model_params`` dict. Train mode must return ``loss``; predict
    mode must return ``predictions`` (the named outputs an inference server gets).
    Batch-norm and other update ops go in ``tf.compat.v1.GraphKeys.UPDATE_OPS`` as
    usual; the framework runs them with the train op.

``input_fn(worker_index, num_workers, batch_size, params) -> Dataset | iterator``
    Returns a ``tf.data.Dataset`` of ``(features dict, labels)`` batches (built
    inside the worker's graph, never fed from Python), or yields ``(features,
    labels)`` numpy batches forever: ``features`` a dict of name -> array with a
    leading batch dimension, ``labels`` an array. Each worker reads its own shard
    of the data, chosen by ``worker_index``/``num_workers``. Ray Data input and
    the kinds in detail: :mod:`distributed.inputs`.

The package, one job per module: :mod:`.spec` (``ModelSpec``, the modes,
``load_function``), :mod:`.scaffold` (how every graph is initialized),
:mod:`.graphs` (calling ``model_fn``; the one builder of a mode's graph),
:mod:`.walk` (what outputs read and need fed), and the adapters
:mod:`.estimator` and :mod:`.keras`. Only the first two are imported here:
importing this package imports neither TensorFlow nor the config, so the
config's checkpoint selection can use :mod:`.walk` without a cycle.
"""

from distributed.model.scaffold import Initializers, initializers, local_initializer
from distributed.model.spec import (EVAL, MODES, PREDICT, TRAIN, ModelSpec, check_mode,
                                    load_function)

__all__ = ["EVAL", "MODES", "PREDICT", "TRAIN", "Initializers", "ModelSpec", "check_mode",
           "initializers", "load_function", "local_initializer"]
