"""The user's model contract: an Estimator-like ``model_fn`` and an ``input_fn``.

A model is named in the config as ``"package.module:function"``.

``model_fn(features, labels, mode, params) -> ModelSpec``
    Builds a ``tf.compat.v1`` graph (variable scopes, ``get_variable``, ``tf.nn``
    ops) in the current default graph. ``features`` is a dict of name -> tensor
    (placeholders the framework made from the input's first batch), ``labels`` a
    tensor or ``None`` in predict mode, ``mode`` one of :data:`MODES`, ``params``
    the config's ``model_params`` dict. Train mode must return ``loss``; predict
    mode must return ``predictions`` (the named outputs an inference server gets).
    Batch-norm and other update ops go in ``tf.compat.v1.GraphKeys.UPDATE_OPS`` as
    usual; the framework runs them with the train op.

``input_fn(worker_index, num_workers, batch_size, params) -> iterator``
    Yields ``(features, labels)`` numpy batches forever: ``features`` a dict of
    name -> array with a leading batch dimension, ``labels`` an array. Each worker
    reads its own shard of the data, chosen by ``worker_index``/``num_workers``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping

from distributed.errors import ConfigError

TRAIN = "train"
EVAL = "eval"
PREDICT = "predict"
MODES = (TRAIN, EVAL, PREDICT)


@dataclasses.dataclass
class ModelSpec:
    """What a ``model_fn`` returns.

    Attributes:
        loss: Scalar loss tensor. Required in train and eval modes.
        predictions: Named output tensors. Required in predict mode; these become
            the SavedModel's ``serving_default`` outputs.
    """

    loss: Any = None
    predictions: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def load_function(ref: str, field: str, num_args: int) -> Callable[..., Any]:
    """Imports ``"package.module:function"`` and checks it takes ``num_args`` args.

    Args:
        ref: The reference string from the config.
        field: Config field name, used in error messages.
        num_args: Number of positional arguments the function must accept.

    Raises:
        ConfigError: The reference is malformed, does not import, or names something
            that is not a function of the right arity.
    """
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ConfigError(
            f"{field}: expected 'package.module:function', got {ref!r}")
    module_name, func_name = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"{field}: cannot import module {module_name!r} ({e}). Check the "
            "spelling and that the module is on PYTHONPATH (with `ray job "
            "submit`, inside --working-dir).") from e
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        raise ConfigError(
            f"{field}: module {module_name!r} has no function {func_name!r}")
    try:
        inspect.signature(func).bind(*([None] * num_args))
    except TypeError as e:
        raise ConfigError(
            f"{field}: {ref} must accept {num_args} positional arguments ({e})"
        ) from e
    except ValueError:  # builtins without a signature: trust them
        pass
    return func
