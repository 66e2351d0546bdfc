"""Runs a model function written for ``tf.estimator`` under this framework.

One line adapts it::

    from distributed.model.estimator import from_estimator
    model_fn = from_estimator(my_estimator_model_fn)

and the config names ``mymodule:model_fn``. The adapter maps the mode, calls
the function the way an Estimator would, and turns its ``EstimatorSpec`` into
a :class:`distributed.model.ModelSpec`.

TensorFlow 2.16 and later ship no ``tf.estimator``, so code that builds
``tf.estimator.EstimatorSpec`` or compares with ``tf.estimator.ModeKeys`` can
import the stand-ins here instead (``from distributed.model.estimator import
EstimatorSpec, ModeKeys``). Where ``tf.estimator`` still exists its own
``EstimatorSpec`` works too: any object with ``.loss`` and ``.predictions``
attributes is accepted.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from typing import Any, Callable, Mapping, NamedTuple

from distributed.errors import ConfigError
from distributed.model.spec import EVAL, PREDICT, TRAIN, ModelSpec
from distributed.model.walk import variables_read_by


class ModeKeys:
    """The mode strings of ``tf.estimator.ModeKeys`` (predict is ``"infer"``)."""

    TRAIN = "train"
    EVAL = "eval"
    PREDICT = "infer"


_TO_ESTIMATOR_MODE = {TRAIN: ModeKeys.TRAIN, EVAL: ModeKeys.EVAL,
                      PREDICT: ModeKeys.PREDICT}

_IGNORED = ("train_op", "training_hooks", "training_chief_hooks")
"""Spec fields that only matter to the Estimator's own training loop."""


class EstimatorSpec(NamedTuple):
    """A stand-in for ``tf.estimator.EstimatorSpec`` (same fields and order).

    ``loss``, ``predictions``, ``eval_metric_ops`` and ``scaffold`` are used;
    see :func:`from_estimator`.
    """

    mode: str
    predictions: Any = None
    loss: Any = None
    train_op: Any = None
    eval_metric_ops: Any = None
    export_outputs: Any = None
    training_chief_hooks: Any = ()
    training_hooks: Any = ()
    scaffold: Any = None
    evaluation_hooks: Any = ()
    prediction_hooks: Any = ()


class IgnoredTrainOpWarning(UserWarning):
    """An adapted model function's ``train_op`` (or training hooks) never runs."""


def to_estimator_mode(mode: str) -> str:
    """Our mode (:data:`distributed.model.MODES`) as a ``ModeKeys`` string."""
    try:
        return _TO_ESTIMATOR_MODE[mode]
    except (KeyError, TypeError):
        raise ValueError(f"mode: expected one of {tuple(_TO_ESTIMATOR_MODE)}, "
                         f"got {mode!r}") from None


def from_estimator(model_fn: Callable[..., Any]) -> Callable[..., ModelSpec]:
    """Adapts an Estimator ``model_fn`` to ``model_fn(features, labels, mode, params)``.

    The wrapped function is called as an Estimator calls it: ``features``
    first, then ``labels``, ``mode``, ``params`` and ``config`` by keyword, each
    only if its signature names it (``config``, a ``RunConfig`` there, is
    ``None`` here). ``mode`` is a :class:`ModeKeys` string, so comparisons with
    ``tf.estimator.ModeKeys`` work. As in an Estimator, the global step exists
    before the function runs (``tf.compat.v1.train.get_global_step()`` is not
    ``None``).

    From the returned spec ``loss``, ``predictions`` and ``eval_metric_ops``
    (as :attr:`ModelSpec.eval_metrics`, recorded as ``eval/<name>`` when the
    config has an ``eval`` block) are kept; a single prediction tensor becomes
    ``{"output": tensor}``, the name an Estimator's export gives it. The
    ``scaffold`` is honoured as Estimator honours it (its ``init_op``,
    ``local_init_op`` and ``init_fn``; lookup tables are initialized either
    way: :func:`distributed.model.initializers`).
    ``export_outputs`` is ignored: the serving signature's outputs are the
    predictions.

    The spec's ``train_op`` and training hooks never run: the framework builds
    its own optimizer from the config and averages gradients across workers
    itself. The first spec that has them warns (:class:`IgnoredTrainOpWarning`,
    once per adapted function and process). Their ops stay in the graph,
    unused; the non-trainable variables only they use (the function's own
    optimizer slots) are taken out of the graph's collections, so they are
    neither initialized, handed to workers nor saved, and the framework's own
    slots get the next free names (``<var>/Adam_2``, ``beta1_power_1``).
    Batch-norm updates must be in ``UPDATE_OPS``, as an Estimator's
    ``train_op`` would have required.

    Args:
        model_fn: ``model_fn(features, labels, mode, params, config)`` or any
            subset of those parameters after ``features``, returning a
            ``tf.estimator.EstimatorSpec`` or :class:`EstimatorSpec`.

    Returns:
        A model function for :mod:`distributed.model`'s contract.
    """
    name = getattr(model_fn, "__qualname__", None) or repr(model_fn)
    accepted = _accepted_args(model_fn)
    warned = threading.Event()

    def adapted(features: Any, labels: Any, mode: str,
                params: Mapping[str, Any]) -> ModelSpec:
        import tensorflow as tf
        kwargs = {"labels": labels, "mode": to_estimator_mode(mode),
                  "params": dict(params or {}), "config": None}
        tf.compat.v1.train.get_or_create_global_step()
        before = {v.op.name for v in tf.compat.v1.global_variables()}
        spec = model_fn(features, **{k: v for k, v in kwargs.items() if k in accepted})
        converted = _to_model_spec(spec, name)
        ignored = [f for f in _IGNORED if getattr(spec, f, None)]
        dropped = _drop_unused_state(before, converted) if ignored else []
        if ignored and not warned.is_set():
            warned.set()
            _warn_ignored(name, ignored, dropped)
        return converted

    return _named_like(adapted, model_fn, f"from_estimator({name})")


def _named_like(adapted: Callable, fn: Callable, qualname: str) -> Callable:
    """Gives an adapter the wrapped function's name, docstring and module."""
    adapted.__name__ = getattr(fn, "__name__", adapted.__name__)
    adapted.__qualname__ = qualname
    adapted.__doc__ = fn.__doc__
    adapted.__module__ = getattr(fn, "__module__", __name__)
    return adapted


def _accepted_args(fn: Callable[..., Any]) -> frozenset[str]:
    """Which of ``labels, mode, params, config`` the Estimator function takes."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset({"labels", "mode", "params", "config"})
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return frozenset({"labels", "mode", "params", "config"})
    return frozenset(p.name for p in parameters) & {"labels", "mode", "params", "config"}


def _to_model_spec(spec: Any, name: str) -> ModelSpec:
    """Keeps ``loss``, ``predictions``, ``eval_metric_ops`` and ``scaffold`` of
    an EstimatorSpec-like object."""
    if isinstance(spec, ModelSpec):
        return spec
    if not (hasattr(spec, "loss") and hasattr(spec, "predictions")):
        raise ConfigError(
            f"model: {name} returned {type(spec).__name__}, which has no .loss and "
            ".predictions; an Estimator model_fn must return an EstimatorSpec "
            "(tf.estimator's or distributed.model.estimator.EstimatorSpec)")
    predictions = spec.predictions
    if predictions is None:
        predictions = {}
    elif not isinstance(predictions, Mapping):
        predictions = {"output": predictions}
    return ModelSpec(loss=spec.loss, predictions=dict(predictions),
                     eval_metrics=dict(getattr(spec, "eval_metric_ops", None) or {}),
                     scaffold=getattr(spec, "scaffold", None))


def _drop_unused_state(before: set[str], spec: ModelSpec) -> list[str]:
    """Removes from the graph's collections the non-trainable variables the
    model_fn just created that neither the loss, the predictions nor
    ``UPDATE_OPS`` read (its own optimizer's slots); returns their names.

    Only the ignored ``train_op`` uses them, so initializing, handing out and
    saving them would only cost memory and checkpoint bytes.
    """
    import tensorflow as tf
    graph = tf.compat.v1.get_default_graph()
    trainable = {v.op.name for v in tf.compat.v1.trainable_variables()}
    created = [v for v in tf.compat.v1.global_variables()
               if v.op.name not in before and v.op.name not in trainable]
    if not created:
        return []
    roots = [t for t in [spec.loss, *spec.predictions.values()] if t is not None]
    used = variables_read_by(
        roots + graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS))
    unused = {id(v) for v in created if v.op.name not in used}
    for key in graph.get_all_collection_keys():
        items = graph.get_collection_ref(key)
        items[:] = [item for item in items if id(item) not in unused]
    return [v.op.name for v in created if id(v) in unused]


def _warn_ignored(name: str, fields: list[str], dropped: list[str]) -> None:
    """Warns (once per adapted function) that the spec's training parts never run."""
    note = ""
    if dropped:
        note = (f" The {len(dropped)} variable(s) only it uses (e.g. "
                f"{', '.join(dropped[:3])}) are neither initialized nor saved.")
    warnings.warn(
        f"model: {name} returned {' and '.join(fields)}, which the framework "
        "ignores: it trains with the optimizer named in the config (set "
        "optimizer: to match the one your model_fn built) and averages "
        f"gradients across workers itself.{note}", IgnoredTrainOpWarning,
        stacklevel=3)


_INPUT_ARGS = ("mode", "params", "config", "input_context")


def from_estimator_input(input_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adapts an Estimator ``input_fn`` to ``input_fn(worker_index, num_workers,
    batch_size, params)``.

    The wrapped function is called as an Estimator calls it, with ``mode``
    (``ModeKeys.TRAIN``), ``params``, ``config`` (``None``) and
    ``input_context`` by keyword, each only if its signature names it.
    ``params`` is the config's ``input_params`` plus ``batch_size`` (the
    per-worker batch). ``input_context`` is a real
    ``tf.distribute.InputContext``: ``num_input_pipelines`` is the number of
    workers, ``input_pipeline_id`` this worker's index, and
    ``get_per_replica_batch_size(global_batch)`` divides by the workers.

    A function that takes ``input_context`` shards its data itself (the fast
    way: each worker reads only its files). One that does not sees all of it;
    its dataset is then sharded by batch (``dataset.shard(num_workers,
    worker_index)``, what ``MultiWorkerMirroredStrategy``'s auto-shard by data
    does), so every worker builds every batch and keeps its own.

    Args:
        input_fn: ``input_fn(params)``, ``input_fn(input_context)``,
            ``input_fn(mode, params, config, input_context)`` or any subset,
            returning a ``tf.data.Dataset`` of ``(features dict, labels)``.
    """
    name = getattr(input_fn, "__qualname__", None) or repr(input_fn)
    try:
        parameters = list(inspect.signature(input_fn).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    accepted = ({p.name for p in parameters} & set(_INPUT_ARGS)
                if not any(p.kind == p.VAR_KEYWORD for p in parameters)
                else set(_INPUT_ARGS))
    unknown = [p.name for p in parameters if p.name not in _INPUT_ARGS
               and p.default is p.empty and p.kind not in (p.VAR_KEYWORD,
                                                            p.VAR_POSITIONAL)]
    if unknown:
        raise ConfigError(
            f"input: {name} takes {', '.join(unknown)}, which an Estimator never "
            f"passes; an Estimator input_fn takes some of {', '.join(_INPUT_ARGS)}")

    def adapted(worker_index: int, num_workers: int, batch_size: int,
                params: Mapping[str, Any]):
        import tensorflow as tf
        context = tf.distribute.InputContext(num_input_pipelines=num_workers,
                                             input_pipeline_id=worker_index,
                                             num_replicas_in_sync=num_workers)
        kwargs = {"mode": ModeKeys.TRAIN,
                  "params": {**dict(params or {}), "batch_size": batch_size},
                  "config": None, "input_context": context}
        result = input_fn(**{k: v for k, v in kwargs.items() if k in accepted})
        if not isinstance(result, tf.data.Dataset):
            raise ConfigError(
                f"input: {name} returned {type(result).__name__}; adapted Estimator "
                "input functions must return a tf.data.Dataset of (features dict, "
                "labels) batches")
        if "input_context" not in accepted and num_workers > 1:
            result = result.shard(num_workers, worker_index)
        return result

    return _named_like(adapted, input_fn, f"from_estimator_input({name})")


__all__ = ["EstimatorSpec", "IgnoredTrainOpWarning", "ModeKeys", "from_estimator",
           "from_estimator_input", "to_estimator_mode"]
