"""The config's sections: the optimizer, checkpoints, evaluation, early stop.

Each is a dataclass built from YAML by :func:`distributed.config.coerce.build`
(types, choices and unknown keys), then checked by its ``validate`` (ranges,
references, and rules across fields), so every error names its field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

from distributed.checkpoint.metric_goal import MetricMode
from distributed.config.checks import (check_input, check_ref, non_negative_int,
                                       positive, positive_int)
from distributed.config.coerce import choice, coerce, unquote_hint
from distributed.errors import ConfigError

SCHEDULES = ("constant", "piecewise", "exponential", "cosine", "polynomial")


@dataclasses.dataclass
class OptimizerConfig:
    """The optimizer (built identically on every worker and the coordinator).

    In YAML a mapping ``{name: rmsprop, learning_rate: 0.01, decay: 0.9}``:
    every key but ``name``, ``learning_rate``, ``clip_global_norm``,
    ``ema_decay`` and ``ema_num_updates`` is a keyword argument of the
    optimizer's constructor (checked against its signature when the graph is
    built, see :mod:`distributed.train.optimizers`).
    Or a string ``"package.module:function"``: ``fn(learning_rate, params)``
    returns a ``tf.compat.v1.train.Optimizer``, given the learning-rate tensor
    and ``model_params`` (``{name: "package.module:function", learning_rate:
    ...}`` gives it a schedule).

    Attributes:
        name: A ``tf.compat.v1.train`` optimizer in snake case (``adam``,
            ``sgd``, ``momentum``, ``rmsprop``, ``adagrad``, ``adadelta``,
            ``ftrl``, ``adagrad_da``, ``proximal_adagrad``,
            ``proximal_gradient_descent``), or ``package.module:function``.
        learning_rate: A positive number, or a schedule on the global step:
            ``{schedule: constant|piecewise|exponential|cosine|polynomial,
            initial: LR, warmup_steps: N, ...}``; the other keys are the
            arguments of ``tf.compat.v1.train.piecewise_constant``
            (``boundaries``, ``values``; no ``initial``),
            ``exponential_decay`` (``decay_steps``, ``decay_rate``,
            ``staircase``), ``cosine_decay`` (``decay_steps``, ``alpha``) or
            ``polynomial_decay`` (``decay_steps``, ``end_learning_rate``,
            ``power``, ``cycle``). ``warmup_steps`` scales the schedule's value
            linearly from 0 at step 0 to 1 at step N.
        clip_global_norm: Clip the all-reduced gradients to this global norm
            (``null``: no clipping).
        ema_decay: Keep an exponential moving average of every trainable
            variable with this decay, in ``(0, 1)`` (e.g. ``0.999``), updated by
            each train step after the optimizer's update
            (``tf.compat.v1.train.ExponentialMovingAverage``). The averages are
            non-trainable variables ``<variable>/ExponentialMovingAverage``,
            in full checkpoints and restored on resume; ``selection.serve_ema``
            serves them. ``null``: no averages.
        ema_num_updates: Give the average the global step as ``num_updates``,
            so its decay is ``min(ema_decay, (1 + step) / (10 + step))`` and
            early averages forget their initial values faster.
        kwargs: The constructor's other keyword arguments (``momentum``
            defaults to 0.9 for ``momentum``).
    """

    name: str = "adam"
    learning_rate: Any = 0.001
    clip_global_norm: float | None = None
    ema_decay: float | None = None
    ema_num_updates: bool = False
    kwargs: dict = dataclasses.field(default_factory=dict)

    OWN_KEYS = ("name", "learning_rate", "clip_global_norm", "ema_decay",
                "ema_num_updates")
    _OWN_HINTS = {"name": str, "clip_global_norm": float | None,
                  "ema_decay": float | None, "ema_num_updates": bool}

    @classmethod
    def from_value(cls, value: Any, path: str) -> "OptimizerConfig":
        """From YAML: a mapping, or a ``package.module:function`` string."""
        if isinstance(value, str) and ":" in value:
            check_ref(value, path)
            return cls(name=value)
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{path}: expected a mapping such as {{name: adam, learning_rate: "
                f"0.001}} or a 'package.module:function' string, got {value!r}")
        own = {k: v for k, v in value.items() if k in cls.OWN_KEYS}
        for key, hint in cls._OWN_HINTS.items():
            if key in own:
                own[key] = coerce(own[key], hint, f"{path}.{key}")
        kwargs = {k: v for k, v in value.items() if k not in cls.OWN_KEYS}
        return cls(**own, kwargs=kwargs)

    @property
    def function(self) -> str | None:
        """The ``package.module:function`` the name gives, or ``None``."""
        return self.name if ":" in self.name else None

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (a flat mapping) that :meth:`from_value` reads back."""
        ema = {} if self.ema_decay is None else {
            "ema_decay": self.ema_decay, "ema_num_updates": self.ema_num_updates}
        return {"name": self.name, "learning_rate": self.learning_rate,
                "clip_global_norm": self.clip_global_norm, **ema, **self.kwargs}

    def validate(self, path: str) -> None:
        """Checks the form; names and keys are checked against TensorFlow's
        signatures by :func:`distributed.train.optimizers.check`."""
        if not self.name:
            raise ConfigError(f"{path}.name: expected an optimizer name such as adam")
        if self.function:
            check_ref(self.function, f"{path}.name")
            if self.kwargs:
                raise ConfigError(
                    f"{path}.{sorted(self.kwargs, key=str)[0]}: an optimizer function "
                    f"({self.function}) takes no constructor arguments; give them to "
                    "it through model_params")
        if self.clip_global_norm is not None:
            positive(self.clip_global_norm, f"{path}.clip_global_norm")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"{path}.ema_decay: expected a number between 0 and 1 "
                              f"(exclusive), such as 0.999, got {self.ema_decay!r}")
        if self.ema_num_updates and self.ema_decay is None:
            raise ConfigError(f"{path}.ema_num_updates: needs {path}.ema_decay (the "
                              "moving average's decay, such as 0.999)")
        _check_learning_rate(self.learning_rate, f"{path}.learning_rate")


def _check_learning_rate(value: Any, path: str) -> None:
    if not isinstance(value, Mapping):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{path}: expected a number, got {value!r}{unquote_hint(value)} "
                f"(or a schedule: {{schedule: {'|'.join(SCHEDULES)}, ...}})")
        positive(value, path)
        return
    schedule = choice(value.get("schedule"), SCHEDULES, f"{path}.schedule")
    non_negative_int(value.get("warmup_steps", 0), f"{path}.warmup_steps")
    if schedule == "piecewise":
        if "initial" in value:
            raise ConfigError(f"{path}.initial: a piecewise schedule takes no initial "
                              "value; its values list gives every rate")
    else:
        if "initial" not in value:
            raise ConfigError(f"{path}.initial: missing; the {schedule} schedule starts "
                              "from initial: LR (a positive number)")
        positive(value["initial"], f"{path}.initial")


@dataclasses.dataclass
class CheckpointConfig:
    """When and how checkpoints are written.

    Attributes:
        serving_every: Write a serving checkpoint (the selection) every N steps;
            0 turns them off. The last step always gets one.
        full_every: Write a full checkpoint (every variable, for resuming) every
            M steps; 0 turns them off. The last step always gets one.
        shards: ``.data`` files per checkpoint; ``null`` picks from the size.
        on_busy: What a checkpoint step does when the previous save is still
            being written: ``wait`` for it, or ``skip`` this checkpoint.
            ``wait`` waits at most half of ``collective_timeout`` (the other
            workers wait in the next all-reduce meanwhile), then skips; the
            last step's checkpoints always queue behind the save in flight.
    """

    serving_every: int = 100
    full_every: int = 500
    shards: int | None = None
    on_busy: Literal["wait", "skip"] = "wait"

    def validate(self, path: str) -> None:
        non_negative_int(self.serving_every, f"{path}.serving_every")
        non_negative_int(self.full_every, f"{path}.full_every")
        if self.shards is not None:
            positive_int(self.shards, f"{path}.shards")


@dataclasses.dataclass
class StopWhen:
    """Early stop: end the run when an eval metric stops improving.

    Attributes:
        metric: ``eval/loss`` or ``eval/<name>`` of the model's ``eval_metrics``.
        mode: ``min`` (lower is better) or ``max``.
        patience: Evaluations in a row without a new best before the run stops.
    """

    metric: str = "eval/loss"
    mode: MetricMode = "min"
    patience: int = 3

    def validate(self, path: str) -> None:
        if not isinstance(self.metric, str) or not self.metric.startswith("eval/"):
            raise ConfigError(f"{path}.metric: expected an eval metric such as "
                              f"eval/loss or eval/accuracy, got {self.metric!r}")
        positive_int(self.patience, f"{path}.patience")


class NamedInput:
    """The parts of an ``input`` field: an ``input_fn``'s reference, or a Ray
    Data input ``{ray_dataset: package.module:function, label: COLUMN}``."""

    input: Any

    @property
    def ray_input(self) -> bool:
        """Whether the input is a Ray Data dataset (``input: {ray_dataset: ...}``)."""
        return isinstance(self.input, Mapping)

    @property
    def input_ref(self) -> str:
        """The ``package.module:function`` the input names."""
        return self.input["ray_dataset"] if self.ray_input else self.input

    @property
    def input_label(self) -> str | None:
        """Ray Data input: the label column."""
        return self.input["label"] if self.ray_input else None


@dataclasses.dataclass
class EvalConfig(NamedInput):
    """Evaluation of serving checkpoints on the coordinator's side (the
    workers never wait for it); see :mod:`distributed.train.evaluation`.

    Attributes:
        input: The eval ``input_fn`` (``package.module:function``; a generator
            or a ``tf.data`` dataset, as for training), called as
            ``input_fn(0, 1, batch_size, params)``; or a Ray Data input
            ``{ray_dataset: package.module:function, label: COLUMN}``, whose
            function the driver calls once (with ``input_params``) and which
            each evaluation reads from start to end.
        every: Evaluate every N steps (a multiple of
            ``checkpoint.serving_every``); ``null``: every serving checkpoint.
        batches: Batches per evaluation; ``null`` reads the input to its end
            (it must end: a finite ``tf.data`` dataset or generator).
        batch_size: ``null``: the training's ``batch_size``.
        input_params: ``null``: the training's ``input_params``.
        stop_when: Early stop, see :class:`StopWhen` (``null``: never).
    """

    input: Any = None
    every: int | None = None
    batches: int | None = None
    batch_size: int | None = None
    input_params: dict | None = None
    stop_when: StopWhen | None = None

    def params_or(self, training_params: dict) -> dict:
        """The eval input's params: its own, else the training input's."""
        return training_params if self.input_params is None else self.input_params

    def validate(self, path: str, serving_every: int) -> None:
        if self.input is None:
            raise ConfigError(f"{path}.input: missing; name the eval input_fn "
                              "('package.module:function') or a Ray Data input")
        check_input(self.input, f"{path}.input")
        if serving_every == 0:
            raise ConfigError(
                f"{path}: evaluation runs on serving checkpoints, but "
                "checkpoint.serving_every is 0; set it (e.g. 100) or drop eval")
        if self.every is not None:
            positive_int(self.every, f"{path}.every")
            if self.every % serving_every:
                nearest = serving_every * max(1, round(self.every / serving_every))
                raise ConfigError(
                    f"{path}.every: {self.every} is not a multiple of "
                    f"checkpoint.serving_every ({serving_every}); evaluation runs on "
                    f"serving checkpoints: use e.g. {nearest}")
        if self.batches is not None:
            positive_int(self.batches, f"{path}.batches")
        if self.batch_size is not None:
            positive_int(self.batch_size, f"{path}.batch_size")
        if self.stop_when is not None:
            self.stop_when.validate(f"{path}.stop_when")
