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
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import traceback
from typing import Any, Callable, Mapping

from distributed.errors import ConfigError, UserCodeError

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
        eval_metrics: Eval mode: ``{name: (value_tensor, update_op)}``, the shape
            of an Estimator's ``eval_metric_ops`` (``tf.compat.v1.metrics.accuracy``,
            ``auc``, ``mean``, ...). Recorded as ``eval/<name>`` with the
            checkpoint evaluated; the mean loss is always ``eval/loss``.
        scaffold: Optional ``tf.compat.v1.train.Scaffold`` (an EstimatorSpec's),
            honoured as Estimator honours it (see :func:`initializers`).
    """

    loss: Any = None
    predictions: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scaffold: Any = None


@dataclasses.dataclass
class Initializers:
    """How a graph the framework runs is initialized (Estimator's Scaffold).

    Attributes:
        init_op: Initializes the global variables (the scaffold's ``init_op``,
            else ``global_variables_initializer()``).
        local_init_op: Runs after ``init_op`` and after a restore: local
            variables, lookup tables (``TABLE_INITIALIZERS``) and local
            resources; the scaffold's ``local_init_op``, else the
            ``LOCAL_INIT_OP`` collection's op, else Scaffold's default.
        init_fn: The scaffold's ``init_fn`` (``init_fn(session)``, bound to its
            scaffold), or ``None``. NOTE: only the chief runs it, on a fresh
            start (never on a resume), as Estimator does; the workers then get
            the values it set.
    """

    init_op: Any
    local_init_op: Any
    init_fn: Callable[[Any], None] | None = None

    def grouped(self) -> Any:
        """``init_op`` and ``local_init_op`` as one op (no ``init_fn``)."""
        import tensorflow as tf
        return tf.group(self.init_op, self.local_init_op)

    def run(self, session, chief: bool = False) -> None:
        """``init_op``, then (chief) ``init_fn``, then ``local_init_op``."""
        session.run(self.init_op)
        if chief and self.init_fn is not None:
            self.init_fn(session)
        session.run(self.local_init_op)


def initializers(scaffold: Any = None) -> Initializers:
    """The :class:`Initializers` of the current default graph, given the
    model's ``scaffold`` (or ``None``), with ``tf.compat.v1.train.Scaffold``'s
    rules: what a model_fn built for Estimator expects to have run, lookup
    tables of ``tf.compat.v1.feature_column`` vocabulary columns included."""
    import tensorflow as tf
    init_op = getattr(scaffold, "init_op", None)
    if init_op is None:
        init_op = tf.compat.v1.global_variables_initializer()
    return Initializers(init_op, local_initializer(scaffold),
                        getattr(scaffold, "init_fn", None))


def local_initializer(scaffold: Any = None) -> Any:
    """:attr:`Initializers.local_init_op` alone (what a SavedModel's main op
    runs): the scaffold's ``local_init_op``, else the ``LOCAL_INIT_OP``
    collection's op, else Scaffold's default (local variables, tables, local
    resources). Checks the tables' vocabulary files first."""
    import tensorflow as tf
    check_vocabulary_files()
    local = getattr(scaffold, "local_init_op", None)
    if local is None:
        collected = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.LOCAL_INIT_OP)
        local = (tf.group(*collected) if collected else
                 tf.compat.v1.train.Scaffold.default_local_init_op())
    return local


SIGNATURES = {
    "model": "model_fn(features, labels, mode, params)",
    "input": "input_fn(worker_index, num_workers, batch_size, params)",
    "optimizer": "optimizer_fn(learning_rate, params)",
}
"""The contract of each config field that names a function, for error messages."""


def check_vocabulary_files() -> None:
    """Raises :class:`ConfigError` naming a vocabulary file that a lookup table
    of the current default graph reads (``categorical_column_with_vocabulary_file``,
    ``tf.lookup.TextFileInitializer``) and that this node does not have, before
    initializing the table fails with TensorFlow's ``NotFoundError``."""
    import tensorflow as tf
    from tensorflow.python.framework import tensor_util
    for op in tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.TABLE_INITIALIZERS):
        if not op.type.startswith("InitializeTableFromTextFile"):
            continue
        path = tensor_util.constant_value(op.inputs[1])
        if path is None:
            continue
        path = path.item() if hasattr(path, "item") else path  # a 0-d array
        path = path.decode() if isinstance(path, bytes) else str(path)
        if not tf.io.gfile.exists(path):
            raise missing_vocabulary(f"vocabulary file {path!r} (table "
                                     f"{op.inputs[0].op.name!r})")


def missing_vocabulary(what: str) -> ConfigError:
    """The one-line error for a vocabulary file this node does not have."""
    import socket
    return ConfigError(
        f"model: {what} does not exist on node {socket.gethostname()}; put it at the "
        "same path on every node (a shared mount, or an object store path such as "
        "gs://...)")


def check_mode(mode: str, labels: Any) -> None:
    """For a ``model_fn``: raises ``ValueError`` for an unknown ``mode`` or
    missing ``labels`` (required in every mode but predict)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode != PREDICT and labels is None:
        raise ValueError(f"labels: required in {mode!r} mode, got None")


def load_function(ref: str, field: str, num_args: int) -> Callable[..., Any]:
    """Imports ``"package.module:function"`` and checks it takes ``num_args`` args.

    Args:
        ref: The reference string from the config.
        field: Config field name, used in error messages.
        num_args: Number of positional arguments the function must accept.

    Raises:
        ConfigError: The reference is malformed, the module is not found, or it
            names something that is not a function of the right arity.
        UserCodeError: Importing the module raised (its traceback is in the
            message).
    """
    expected = SIGNATURES.get(field, f"a function of {num_args} arguments")
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise ConfigError(
            f"{field}: expected 'package.module:function', got {ref!r}; write the "
            "module's dotted path, a colon, then the function's name (e.g. "
            "'distributed.examples.digits:mlp_model_fn')")
    module_name, func_name = ref.split(":")
    module = _import(module_name, field)
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        defined = [n for n, v in vars(module).items()
                   if callable(v) and not n.startswith("_")
                   and getattr(v, "__module__", None) == module.__name__]
        close = difflib.get_close_matches(func_name, defined, n=1)
        raise ConfigError(
            f"{field}: module {module_name!r} has no function {func_name!r}; "
            f"define {expected} there or fix the name after the colon"
            + (f" (did you mean {close[0]!r}?)" if close else ""))
    try:
        inspect.signature(func).bind(*([None] * num_args))
    except TypeError as e:
        raise ConfigError(
            f"{field}: {ref} cannot be called as {expected} ({e}); give it "
            f"exactly {num_args} positional parameters") from e
    except ValueError:  # builtins without a signature: trust them
        pass
    return func


def _import(module_name: str, field: str) -> Any:
    """Imports the user's module; one-line errors for a missing module."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and not (module_name == missing
                            or module_name.startswith(missing + ".")):
            raise ConfigError(
                f"{field}: module {module_name!r} imports {missing!r}, which is "
                "not installed; install it on every node (or add it to the job's "
                "runtime_env)") from e
        raise ConfigError(
            f"{field}: cannot import module {module_name!r} ({e}); check the "
            "spelling and that the module is on PYTHONPATH (with `ray job "
            "submit`, inside --working-dir)") from e
    except Exception as e:
        ours = (__file__, importlib.__file__)
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if not f.filename.startswith("<frozen") and f.filename not in ours]
        raise UserCodeError(
            f"{field}: importing module {module_name!r} raised "
            f"{type(e).__name__}: {e}\n"
            f"Traceback of module {module_name!r} (most recent call last):\n"
            f"{''.join(traceback.format_list(frames))}"
            f"{''.join(traceback.format_exception_only(type(e), e)).rstrip()}\n"
            f"Fix {module_name!r} (named by the config's {field!r}) and re-run."
        ) from None
