"""The training config: YAML in, typed dataclasses inside, every field validated.

Errors name the field (``checkpoint.serving_every``), the bad value and what
would be valid. Unknown keys are errors, not silently ignored, so a typo
cannot quietly fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping

import yaml

from distributed.checkpoint.retention import Retention
from distributed.checkpoint.selection import SelectionSpec
from distributed.errors import ConfigError, SelectionError
from distributed.storage import uris

SCHEDULES = ("constant", "piecewise", "exponential", "cosine", "polynomial")
ON_BUSY = ("wait", "skip")
RAY_INPUT_KEYS = ("ray_dataset", "label")


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
    _OWN_HINTS = {"clip_global_norm": float | None, "ema_decay": float | None,
                  "ema_num_updates": bool}

    @classmethod
    def from_value(cls, value: Any, path: str) -> "OptimizerConfig":
        """From YAML: a mapping, or a ``package.module:function`` string."""
        if isinstance(value, str) and ":" in value:
            _check_ref(value, path)
            return cls(name=value)
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{path}: expected a mapping such as {{name: adam, learning_rate: "
                f"0.001}} or a 'package.module:function' string, got {value!r}")
        own = {k: v for k, v in value.items() if k in cls.OWN_KEYS}
        for key, hint in cls._OWN_HINTS.items():
            if key in own:
                own[key] = _coerce(own[key], hint, f"{path}.{key}")
        if "name" in own and not isinstance(own["name"], str):
            raise ConfigError(f"{path}.name: expected a string, got {own['name']!r}")
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
            _check_ref(self.function, f"{path}.name")
            if self.kwargs:
                raise ConfigError(
                    f"{path}.{sorted(self.kwargs, key=str)[0]}: an optimizer function "
                    f"({self.function}) takes no constructor arguments; give them to "
                    "it through model_params")
        if self.clip_global_norm is not None:
            _positive(self.clip_global_norm, f"{path}.clip_global_norm")
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
                f"{path}: expected a number, got {value!r}{_unquote_hint(value)} "
                f"(or a schedule: {{schedule: {'|'.join(SCHEDULES)}, ...}})")
        _positive(value, path)
        return
    schedule = value.get("schedule")
    if schedule not in SCHEDULES:
        close = difflib.get_close_matches(str(schedule), SCHEDULES, n=1)
        raise ConfigError(
            f"{path}.schedule: {schedule!r} is not valid; "
            f"{f'did you mean {close[0]!r}? ' if close else ''}use one of "
            f"{', '.join(SCHEDULES)}")
    _non_negative_int(value.get("warmup_steps", 0), f"{path}.warmup_steps")
    if schedule == "piecewise":
        if "initial" in value:
            raise ConfigError(f"{path}.initial: a piecewise schedule takes no initial "
                              "value; its values list gives every rate")
    else:
        if "initial" not in value:
            raise ConfigError(f"{path}.initial: missing; the {schedule} schedule starts "
                              "from initial: LR (a positive number)")
        _positive(value["initial"], f"{path}.initial")


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
    on_busy: str = "wait"

    def validate(self, path: str) -> None:
        _non_negative_int(self.serving_every, f"{path}.serving_every")
        _non_negative_int(self.full_every, f"{path}.full_every")
        if self.shards is not None:
            _positive_int(self.shards, f"{path}.shards")
        _choice(self.on_busy, ON_BUSY, f"{path}.on_busy")


@dataclasses.dataclass
class StopWhen:
    """Early stop: end the run when an eval metric stops improving.

    Attributes:
        metric: ``eval/loss`` or ``eval/<name>`` of the model's ``eval_metrics``.
        mode: ``min`` (lower is better) or ``max``.
        patience: Evaluations in a row without a new best before the run stops.
    """

    metric: str = "eval/loss"
    mode: str = "min"
    patience: int = 3

    def validate(self, path: str) -> None:
        if not isinstance(self.metric, str) or not self.metric.startswith("eval/"):
            raise ConfigError(f"{path}.metric: expected an eval metric such as "
                              f"eval/loss or eval/accuracy, got {self.metric!r}")
        _choice(self.mode, ("min", "max"), f"{path}.mode")
        _positive_int(self.patience, f"{path}.patience")


class _NamedInput:
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
class EvalConfig(_NamedInput):
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
        _check_input_value(self.input, f"{path}.input")
        if serving_every == 0:
            raise ConfigError(
                f"{path}: evaluation runs on serving checkpoints, but "
                "checkpoint.serving_every is 0; set it (e.g. 100) or drop eval")
        if self.every is not None:
            _positive_int(self.every, f"{path}.every")
            if self.every % serving_every:
                raise ConfigError(
                    f"{path}.every: {self.every} is not a multiple of "
                    f"checkpoint.serving_every ({serving_every}); evaluation runs on "
                    f"serving checkpoints: use e.g. {serving_every * max(1, round(self.every / serving_every))}")
        if self.batches is not None:
            _positive_int(self.batches, f"{path}.batches")
        if self.batch_size is not None:
            _positive_int(self.batch_size, f"{path}.batch_size")
        if self.stop_when is not None:
            self.stop_when.validate(f"{path}.stop_when")


@dataclasses.dataclass
class TrainConfig(_NamedInput):
    """A training run.

    Attributes:
        model: ``package.module:function`` of the ``model_fn``.
        model_params: Passed to the ``model_fn`` as ``params``.
        input: ``package.module:function`` of the ``input_fn`` (it returns a
            ``tf.data.Dataset`` or yields numpy batches), or
            ``{ray_dataset: package.module:function, label: COLUMN}`` for a
            Ray Data dataset (see README: Your input).
        input_params: Passed to the ``input_fn`` (or the ``ray_dataset``
            function) as ``params``.
        input_prefetch: Batches a Python input (generator, Ray Data) reads
            ahead on a background thread; 0 reads on the training thread.
        optimizer: See :class:`OptimizerConfig`.
        batch_size: Examples per worker per step.
        steps: Total training steps (including steps done before a resume).
        workers: Data-parallel workers (Ray actors).
        gpus_per_worker: GPUs each worker asks Ray for: 1 on a GPU cluster
            (one worker per GPU; a worker uses its first), 0 for CPU workers
            (local dev mode); a fraction below 1 with one worker only (NCCL
            refuses two ranks on one GPU).
        cpus_per_worker: CPUs each worker asks Ray for (fractions allowed).
        storage: Directory shared by every node (local path in dev mode), or an
            object store URI such as ``s3://bucket/prefix`` (see README).
        storage_options: For object stores: ``pyarrow.fs`` options such as
            ``endpoint_override``, ``region``, ``scheme``; they win over the
            URI's query and the usual environment variables (keep credentials
            in the environment, not here).
        staging: Local directory where checkpoints of an object-store run are
            written before upload (and cached when read back).
        run: Run name; checkpoints go to ``<storage>/<run>/``. Re-using a run
            name with a full checkpoint resumes it.
        selection: What serving checkpoints hold: ``{policy, include, exclude,
            serve_ema}``; ``serve_ema: true`` saves the moving averages of
            ``optimizer.ema_decay`` under the model's own variable names.
        checkpoint: See :class:`CheckpointConfig`.
        retention: Per tier (``serving``, ``full``): ``{keep_last, keep_every,
            keep_best: {n, metric, mode}}``.
        log_every: Print progress every N steps.
        collective_timeout: Seconds an all-reduce waits for a peer before the
            step fails (so a dead worker cannot hang the job).
        max_failures: Times the worker group may fail (a worker or the
            coordinator dies, a collective times out) and be restarted from the
            latest full checkpoint before the job gives up; 0 fails at once.
        bucket_mib: Gradient bytes per all-reduce bucket.
        sparse_density_threshold: A sparse gradient (``tf.IndexedSlices``, an
            embedding lookup's) is all-gathered, rows and indices, when that
            is at most this times its dense bytes, and all-reduced densely
            otherwise: 0.5 gathers a 200,000-row table's gradient of 1,024
            rows a step rather than send the whole table. 0 always
            all-reduces densely. Decided when the graph is built, from static
            shapes; an unknown batch dimension counts as ``batch_size``.
        steps_per_run: Training steps per ``Session.run`` on the workers: an
            in-graph loop (as Keras' ``steps_per_execution`` or
            TPUEstimator's ``iterations_per_loop``) that saves the per-run
            round trip and Python time on all but one step of the loop; the
            steps and their results are the same. Worth it for small, fast
            steps (a few ms); 1 runs one step per ``Session.run``. A run never
            crosses a checkpoint step or a ``log_every`` boundary.
        seed: Graph-level random seed.
        eval: Evaluation of serving checkpoints, see :class:`EvalConfig`
            (``null``: none; the only metric is then the training ``loss``).
    """

    model: str = "distributed.examples.digits:cnn_bn_model_fn"
    model_params: dict = dataclasses.field(default_factory=dict)
    input: Any = "distributed.examples.digits:digits_input_fn"
    input_params: dict = dataclasses.field(default_factory=dict)
    input_prefetch: int = 2
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    batch_size: int = 64
    steps: int = 500
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    storage: str = "runs"
    storage_options: dict = dataclasses.field(default_factory=dict)
    staging: str = ""  # "" = DEFAULT_STAGING (the temp dir's dtr-staging/)
    run: str = "digits-cnn"
    selection: dict = dataclasses.field(
        default_factory=lambda: {"policy": "inference"})
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    retention: dict = dataclasses.field(default_factory=lambda: {
        "serving": {"keep_last": 5}, "full": {"keep_last": 2}})
    log_every: int = 50
    collective_timeout: float = 120.0
    max_failures: int = 3
    bucket_mib: float = 8.0
    sparse_density_threshold: float = 0.5
    steps_per_run: int = 1
    seed: int = 0
    eval: EvalConfig | None = None

    def validate(self) -> "TrainConfig":
        """Checks every field; returns self. Raises :class:`ConfigError`."""
        _check_ref(self.model, "model")
        self._check_input()
        _non_negative_int(self.input_prefetch, "input_prefetch")
        self.optimizer.validate("optimizer")
        self.checkpoint.validate("checkpoint")
        for field in ("batch_size", "steps", "workers", "log_every", "steps_per_run"):
            _positive_int(getattr(self, field), field)
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker: expected >= 0, got {self.gpus_per_worker!r}")
        self._check_gpus()
        _positive(self.cpus_per_worker, "cpus_per_worker")
        _positive(self.collective_timeout, "collective_timeout")
        if type(self.max_failures) is not int or self.max_failures < 0:
            raise ConfigError(f"max_failures: expected an integer >= 0, got "
                              f"{self.max_failures!r}")
        _positive(self.bucket_mib, "bucket_mib")
        _check_density_threshold(self.sparse_density_threshold)
        uris.check_storage(self.storage)
        from distributed.checkpoint.layout import check_run_name
        try:
            check_run_name(self.run)
        except ValueError as e:
            raise ConfigError(f"run: {e}") from None
        if self.eval is not None:
            self.eval.validate("eval", self.checkpoint.serving_every)
        if self.selection_spec().serve_ema and self.optimizer.ema_decay is None:
            raise ConfigError("selection.serve_ema: needs optimizer.ema_decay (e.g. "
                              "0.999): without it there are no averages to serve")
        self._check_eval_metric_uses()
        self.retention_for("serving")
        self.retention_for("full")
        unknown = set(self.retention) - {"serving", "full"}
        if unknown:
            raise ConfigError(f"retention: unknown tier(s) {sorted(unknown)}; use "
                              "serving and/or full")
        return self

    def _check_input(self) -> None:
        _check_input_value(self.input, "input")

    def _check_gpus(self) -> None:
        """One NCCL rank per GPU: a fraction of a GPU is for one worker only
        (Ray would put two on one GPU, and NCCL refuses two ranks on one
        device); above 1, Ray takes whole GPUs only."""
        gpus = self.gpus_per_worker
        if 0 < gpus < 1 and self.workers > 1:
            raise ConfigError(
                f"gpus_per_worker: {gpus:g} with {self.workers} workers would put "
                "two workers on one GPU, and NCCL refuses two ranks on one device; "
                "use gpus_per_worker: 1 (one worker per GPU, at most as many "
                "workers as GPUs) or 0 for CPU workers")
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError(f"gpus_per_worker: expected 0, a whole number or (one "
                              f"worker) a fraction below 1, got {gpus!r}")

    def _check_eval_metric_uses(self) -> None:
        """An ``eval/...`` metric named by retention needs an ``eval`` block."""
        if self.eval is not None:
            return
        for tier, rules in (self.retention or {}).items():
            best = (rules or {}).get("keep_best") if isinstance(rules, Mapping) else None
            metric = best.get("metric") if isinstance(best, Mapping) else None
            if isinstance(metric, str) and metric.startswith("eval/"):
                raise ConfigError(
                    f"retention.{tier}.keep_best.metric: {metric} is recorded only "
                    "when the config has an eval block (eval: {input: ...}); add "
                    "one or keep the best by loss")

    @property
    def remote(self) -> bool:
        """Whether ``storage`` is an object store (written through ``staging``)."""
        return uris.is_object_store(self.storage)

    @property
    def storage_path(self) -> str:
        """The local directory the checkpoint store writes: ``storage`` itself,
        or for an object store, its staging mirror under ``staging``."""
        return uris.local_path(self.storage, self.staging or None)

    def selection_spec(self) -> SelectionSpec:
        try:
            return SelectionSpec.from_dict(self.selection)
        except SelectionError:
            raise
        except TypeError as e:
            raise ConfigError(f"selection: {e}") from None

    def retention_for(self, tier: str) -> Retention:
        return Retention.from_dict((self.retention or {}).get(tier),
                                   field=f"retention.{tier}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["optimizer"] = self.optimizer.to_dict()
        return data


def from_dict(data: Mapping[str, Any] | None) -> TrainConfig:
    """Builds and validates a :class:`TrainConfig` from parsed YAML."""
    return _build(TrainConfig, data or {}, "").validate()


def load(path: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Reads a YAML config file and applies command-line overrides.

    Raises:
        ConfigError: The file is missing, not YAML, or has bad fields.
    """
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path!r} is not valid YAML{where}: "
                          f"{problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of fields, "
                          f"got {type(data).__name__}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(data)


def _build(cls, data: Mapping[str, Any], prefix: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, "
                          f"got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key"
            f"{'s ' + str(unknown) if len(unknown) > 1 else ''}; "
            f"{f'did you mean {close[0]!r}? ' if close else ''}valid keys are "
            f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    if hint is OptimizerConfig:
        return OptimizerConfig.from_value(value, path)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{path}.")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(value, hint, path)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}"
                              f"{_unquote_hint(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}"
                              f"{_unquote_hint(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _unquote_hint(value: Any) -> str:
    """A fix hint for a number written as a YAML string (``steps: "100"``)."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string); write the number without quotes"
    return ""


def _check_input_value(value: Any, field: str) -> None:
    """An input: ``package.module:function`` or ``{ray_dataset, label}``."""
    if not isinstance(value, Mapping):
        _check_ref(value, field)
        return
    unknown = sorted(set(value) - set(RAY_INPUT_KEYS), key=str)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), RAY_INPUT_KEYS, n=1)
        raise ConfigError(
            f"{field}.{unknown[0]}: unknown key; "
            f"{f'did you mean {close[0]!r}? ' if close else ''}a Ray Data input "
            "is {ray_dataset: 'package.module:function', label: COLUMN}")
    if "ray_dataset" not in value:
        raise ConfigError(f"{field}.ray_dataset: missing; a Ray Data input is "
                          "{ray_dataset: 'package.module:function', label: COLUMN}")
    _check_ref(value["ray_dataset"], f"{field}.ray_dataset")
    label = value.get("label")
    if not isinstance(label, str) or not label:
        raise ConfigError(f"{field}.label: expected the name of the dataset's label "
                          f"column, got {label!r}")


def _check_ref(ref: Any, field: str) -> None:
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise ConfigError(
            f"{field}: expected 'package.module:function', got {ref!r}; "
            "write the module's dotted path, a colon, then the function's "
            "name (e.g. 'distributed.examples.digits:mlp_model_fn')")


def _choice(value: Any, choices: tuple[str, ...], path: str) -> None:
    if value not in choices:
        raise ConfigError(f"{path}: {value!r} is not valid; use one of "
                          f"{', '.join(choices)}")


def _check_density_threshold(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(
            f"sparse_density_threshold: expected a number >= 0 (e.g. 0.5: gather a "
            f"sparse gradient when its rows are at most half the dense bytes; 0: "
            f"always all-reduce densely), got {value!r}")


def _positive(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{path}: expected a positive number, got {value!r}")


def _positive_int(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: expected a positive integer, got {value!r}")


def _non_negative_int(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: expected an integer >= 0, got {value!r}")
