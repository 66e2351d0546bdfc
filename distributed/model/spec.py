"""What a ``model_fn`` returns, the modes it is called in, and how the config's
``"package.module:function"`` references become functions.

No TensorFlow here: the driver checks a config and loads the user's functions
without paying for its import.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import traceback
from typing import Any, Callable, Mapping

from distributed.errors import ConfigError, UserCodeError, did_you_mean

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
            honoured as Estimator honours it (see
            :func:`distributed.model.initializers`).
    """

    loss: Any = None
    predictions: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scaffold: Any = None


_SIGNATURES = {
    "model": "model_fn(features, labels, mode, params)",
    "input": "input_fn(worker_index, num_workers, batch_size, params)",
    "optimizer": "optimizer_fn(learning_rate, params)",
}
"""The contract of each config field that names a function, for error messages."""


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
    expected = _SIGNATURES.get(field, f"a function of {num_args} arguments")
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
        hint = did_you_mean(func_name, defined).rstrip()
        raise ConfigError(
            f"{field}: module {module_name!r} has no function {func_name!r}; "
            f"define {expected} there or fix the name after the colon"
            + (f" ({hint})" if hint else ""))
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


__all__ = ["EVAL", "MODES", "PREDICT", "TRAIN", "ModelSpec", "check_mode",
           "load_function"]
