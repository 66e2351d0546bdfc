"""The optimizer and its learning-rate schedule, from the config's ``optimizer``.

Every ``tf.compat.v1.train`` class named ``*Optimizer`` that takes a
``learning_rate`` is available under its snake-case name (``RMSPropOptimizer``
is ``rmsprop``, ``AdagradDAOptimizer`` is ``adagrad_da``;
``GradientDescentOptimizer`` is ``sgd``); wrappers such as
``SyncReplicasOptimizer`` take no learning rate and are left out. The
config's other keys are the constructor's keyword arguments, checked against
its signature. The learning rate is a tensor on the global step, so a resumed
run (whose global step comes from the full checkpoint) continues its schedule.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Mapping

import tensorflow as tf

from distributed.config import OptimizerConfig
from distributed.errors import ConfigError, did_you_mean, user_code

RENAMES = {"gradient_descent": "sgd"}
DEFAULTS = {"momentum": {"momentum": 0.9}}  # today's configs keep working
SUPPLIED = ("learning_rate", "global_step", "name")  # never config keys
SCHEDULE_FUNCTIONS = {"piecewise": "piecewise_constant",
                      "exponential": "exponential_decay",
                      "cosine": "cosine_decay", "polynomial": "polynomial_decay"}
SCHEDULE_OWN_KEYS = ("schedule", "warmup_steps", "initial")


def _parameters(fn) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(fn).parameters)
    params.pop("self", None)
    return params


@functools.lru_cache(maxsize=None)
def optimizer_table() -> dict[str, type]:
    """Snake-case name -> ``tf.compat.v1.train`` optimizer class."""
    table = {}
    for attr in dir(tf.compat.v1.train):
        cls = getattr(tf.compat.v1.train, attr)
        if not (attr.endswith("Optimizer") and isinstance(cls, type)
                and issubclass(cls, tf.compat.v1.train.Optimizer)):
            continue
        if "learning_rate" not in _parameters(cls.__init__):
            continue  # the base class and wrappers (SyncReplicasOptimizer)
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", attr[:-len("Optimizer")]).lower()
        table[RENAMES.get(snake, snake)] = cls
    return dict(sorted(table.items()))


def _unknown(path: str, key: str, valid: list[str], what: str) -> ConfigError:
    return ConfigError(
        f"{path}.{key}: unknown key for {what}; {did_you_mean(key, valid)}valid keys are "
        f"{', '.join(valid)}")


def _call(path: str, what: str, fn, kwargs: Mapping[str, Any]):
    """Calls a TF constructor or decay function; its complaints name ``path``."""
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as e:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()
                         if not isinstance(v, (tf.Tensor, tf.Variable)))
        raise ConfigError(f"{path}: {what}({args}) failed: "
                          f"{str(e).splitlines()[0]}") from None


def learning_rate_tensor(value: Any, global_step, path: str = "optimizer.learning_rate"):
    """The learning rate at ``global_step``: a number or a schedule mapping."""
    if not isinstance(value, Mapping):
        return tf.constant(float(value), tf.float32)
    given = {k: v for k, v in value.items() if k not in SCHEDULE_OWN_KEYS}
    if value["schedule"] == "constant":
        if given:
            raise _unknown(path, sorted(given, key=str)[0], list(SCHEDULE_OWN_KEYS),
                           "the constant schedule")
        lr = tf.constant(float(value["initial"]), tf.float32)
    else:
        lr = _decay(value, given, global_step, path)
    warmup = value.get("warmup_steps", 0)
    if warmup:
        lr = lr * tf.minimum(1.0, tf.cast(global_step, tf.float32) / float(warmup))
    return lr


def _decay(value: Mapping[str, Any], given: dict, global_step, path: str):
    """A ``tf.compat.v1.train.*_decay`` (or ``piecewise_constant``) tensor."""
    schedule = value["schedule"]
    name = SCHEDULE_FUNCTIONS[schedule]
    fn = getattr(tf.compat.v1.train, name)
    own = _parameters(fn)
    params = {k: p for k, p in own.items() if k not in SUPPLIED and k != "x"}
    valid = [k for k in SCHEDULE_OWN_KEYS
             if k != "initial" or "learning_rate" in own] + list(params)
    for key in given:
        if key not in params:
            raise _unknown(path, key, valid, f"the {schedule} schedule ({name})")
    missing = [k for k, p in params.items()
               if p.default is inspect.Parameter.empty and k not in given]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: missing; the {schedule} schedule "
                          f"({name}) needs {', '.join(missing)}")
    if schedule == "piecewise":
        values = given["values"]
        if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{path}.values: expected a list of numbers (one more "
                              f"than boundaries), got {values!r}")
        given["values"] = [float(v) for v in values]
        lr = _call(path, name, fn, {"x": global_step, **given})
    else:
        lr = _call(path, name, fn, {"learning_rate": float(value["initial"]),
                                    "global_step": global_step, **given})
    return tf.cast(lr, tf.float32)


def make_optimizer(cfg: OptimizerConfig, global_step, params: Mapping[str, Any],
                   path: str = "optimizer"):
    """Builds ``(optimizer, learning-rate tensor)`` in the default graph."""
    lr = tf.identity(learning_rate_tensor(cfg.learning_rate, global_step,
                                          f"{path}.learning_rate"), name="learning_rate")
    if cfg.function:
        return _from_function(cfg.function, lr, params, path), lr
    table = optimizer_table()
    cls = table.get(cfg.name)
    if cls is None:
        raise ConfigError(
            f"{path}.name: {cfg.name!r} is not valid; {did_you_mean(cfg.name, table)}use one of "
            f"{', '.join(table)} or 'package.module:function'")
    accepted = _parameters(cls.__init__)
    valid = [k for k in accepted if k not in SUPPLIED]
    for key in cfg.kwargs:
        if key not in valid:
            raise _unknown(path, key, list(OptimizerConfig.OWN_KEYS) + valid,
                           f"{cfg.name} ({cls.__name__})")
    kwargs = {**DEFAULTS.get(cfg.name, {}), **cfg.kwargs, "learning_rate": lr}
    if "global_step" in accepted:
        kwargs["global_step"] = global_step
    missing = [k for k, p in accepted.items()
               if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: missing; {cfg.name} "
                          f"({cls.__name__}) needs it")
    return _call(path, cls.__name__, cls, kwargs), lr


def _from_function(ref: str, lr, params: Mapping[str, Any], path: str):
    from distributed.model import load_function
    fn = load_function(ref, path, 2)
    with user_code(path, ref):
        optimizer = fn(lr, dict(params))
    if not isinstance(optimizer, tf.compat.v1.train.Optimizer):
        raise ConfigError(
            f"{path}: {ref} returned {type(optimizer).__name__}; it must return a "
            "tf.compat.v1.train.Optimizer (e.g. tf.compat.v1.train.AdamOptimizer("
            "learning_rate))")
    return optimizer


def check(cfg: OptimizerConfig, params: Mapping[str, Any]) -> None:
    """Builds the optimizer and schedule in a throwaway graph, so a bad name,
    key or value fails in the driver before any actor starts."""
    with tf.Graph().as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        make_optimizer(cfg, step, params)


def clip_gradients(grads_and_vars: list, clip_norm: float | None) -> list:
    """Clips the (already all-reduced) gradients by their global norm."""
    if clip_norm is None:
        return grads_and_vars
    clipped, _ = tf.clip_by_global_norm([g for g, _ in grads_and_vars], clip_norm)
    return list(zip(clipped, [v for _, v in grads_and_vars]))


EMA_SUFFIX = "ExponentialMovingAverage"  # TF's name for an average's variable


def apply_moving_average(cfg: OptimizerConfig, apply_op, global_step,
                         variables=None) -> tuple[Any, dict[str, str]]:
    """Adds ``optimizer.ema_decay``'s moving averages after ``apply_op``.

    The averages' update runs after the optimizer's (a control dependency), so
    it reads the variables as that step left them; every input is the same on
    every replica (the gradients were all-reduced), so the averages stay
    identical too. The shadow variables are ``<variable>/ExponentialMovingAverage``,
    non-trainable globals (so full checkpoints hold them and resume restores them).

    Args:
        cfg: The optimizer config (nothing is added without ``ema_decay``).
        apply_op: The optimizer's ``apply_gradients`` op.
        global_step: The global step (``num_updates`` with ``ema_num_updates``).
        variables: What to average; default every floating-point trainable
            variable of the default graph.

    Returns:
        ``(op, averages)``: the op that applies and then averages (``apply_op``
        itself without ``ema_decay``), and variable name -> its average's name.
    """
    if cfg.ema_decay is None:
        return apply_op, {}
    if variables is None:
        variables = tf.compat.v1.trainable_variables()
    variables = [v for v in variables if v.dtype.base_dtype.is_floating]
    num_updates = global_step if cfg.ema_num_updates else None
    ema = tf.compat.v1.train.ExponentialMovingAverage(
        cfg.ema_decay, num_updates=num_updates, name=EMA_SUFFIX)
    with tf.control_dependencies([apply_op]):
        # The shadows are created in an init scope, free of this dependency.
        average_op = ema.apply(variables)
    return (tf.group(apply_op, average_op, name="apply_and_average"),
            {v.op.name: ema.average(v).op.name for v in variables})


def advancing_global_step(optimizer: tf.compat.v1.train.Optimizer
                          ) -> tf.compat.v1.train.Optimizer:
    """``optimizer`` with an ``apply_gradients`` that also advances ``global_step``.

    For optimizers written by hand whose ``apply_gradients`` ignores its
    ``global_step`` argument (BERT's ``AdamWeightDecayOptimizer`` is one: its
    ``create_optimizer`` increments the step itself). The framework checks
    after the first steps that ``global_step`` advanced, since schedules,
    checkpoint steps and resuming all count on it; return
    ``advancing_global_step(MyOptimizer(...))`` from the config's optimizer
    function to fix such an optimizer without changing it. Do not wrap an
    optimizer that already advances the step: it would count every step twice.
    """
    return _AdvancingGlobalStep(optimizer)


class _AdvancingGlobalStep(tf.compat.v1.train.Optimizer):
    """See :func:`advancing_global_step`. Everything but ``apply_gradients`` is
    the wrapped optimizer's (its slots, variables and name)."""

    def __init__(self, optimizer: tf.compat.v1.train.Optimizer):
        super().__init__(use_locking=False, name=optimizer.get_name())
        self._inner = optimizer

    def compute_gradients(self, *args, **kwargs):
        return self._inner.compute_gradients(*args, **kwargs)

    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        update = self._inner.apply_gradients(grads_and_vars, name=name)
        if global_step is None:
            return update
        with tf.control_dependencies([update]):
            return tf.group(tf.compat.v1.assign_add(global_step, 1),
                            name="advance_global_step")

    def get_slot(self, var, name):
        return self._inner.get_slot(var, name)

    def get_slot_names(self):
        return self._inner.get_slot_names()

    def variables(self):
        return self._inner.variables()
