"""The whole config of a training run (:class:`TrainConfig`).

``selection`` and ``retention`` are typed here, built once at load time
(a :class:`SelectionSpec`; a :class:`Retention` per tier), so a bad one fails
before anything starts and no caller parses them again. :meth:`to_dict` is
the plain form that travels to the actors through Ray and is recorded in
``run_config.json``; :func:`distributed.config.from_dict` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from distributed.checkpoint.layout import TIERS, check_run_name
from distributed.checkpoint.retention import KeepBestN, KeepLastN, Retention
from distributed.checkpoint.selection import SelectionSpec
from distributed.config.checks import (check_input, check_ref, non_negative_int,
                                       parse_bytes, positive, positive_int, regex_list)
from distributed.config.coerce import mapping
from distributed.config.sections import (CheckpointConfig, EvalConfig, NamedInput,
                                         OptimizerConfig)
from distributed.errors import ConfigError
from distributed.storage import uris


def _selection(value: Any, path: str) -> SelectionSpec:
    """``{policy, include, exclude, serve_ema}``; ``null`` is the spec's defaults."""
    try:
        return SelectionSpec.from_dict(mapping(value, path))
    except TypeError as e:  # e.g. a key that is not a string
        raise ConfigError(f"{path}: {e}") from None


def _retention(value: Any, path: str) -> dict[str, Retention]:
    """``{tier: {keep_last, keep_every, keep_best}}``: the tiers named only, as
    the trainer leaves a tier the config does not name alone."""
    value = mapping(value, path)
    tiers = {tier: Retention.from_dict(value[tier], field=f"{path}.{tier}")
             for tier in TIERS if tier in value}
    unknown = set(value) - set(TIERS)
    if unknown:
        raise ConfigError(f"{path}: unknown tier(s) {sorted(unknown, key=str)}; use "
                          "serving and/or full")
    return tiers


@dataclasses.dataclass
class TrainConfig(NamedInput):
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
        input_position: What a resume (or a restart after a failure) does
            with the input. ``exact``: every full checkpoint holds each
            worker's input position at its step (a ``tf.data`` iterator's
            state, shuffle buffers included; a Python input's count of
            consumed batches), and training goes on from there, so no batch
            is trained twice or skipped. ``restart``: each worker's input
            starts again from its beginning (for pipelines whose state
            cannot be saved, e.g. ``from_generator`` or ``py_function``).
        optimizer: See :class:`OptimizerConfig`.
        batch_size: Examples per worker per step.
        steps: Total training steps (including steps done before a resume).
        workers: Data-parallel workers (Ray actors).
        gpus_per_worker: GPUs each worker asks Ray for: 1 on a GPU cluster
            (one worker per GPU; a worker uses its first), 0 for CPU workers
            (local dev mode); a fraction below 1 with one worker only (NCCL
            refuses two ranks on one GPU).
        cpus_per_worker: CPUs each worker asks Ray for (fractions allowed;
            below 1 the worker shares a core and its idle TensorFlow threads
            sleep instead of spinning).
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
        selection: What serving checkpoints hold, a :class:`SelectionSpec`
            (YAML ``{policy, include, exclude, serve_ema}``; ``null``: the
            spec's defaults); ``serve_ema: true`` saves the moving averages of
            ``optimizer.ema_decay`` under the model's own variable names.
        checkpoint: See :class:`CheckpointConfig`.
        retention: A :class:`Retention` per tier (``serving``, ``full``), in
            YAML ``{keep_last, keep_every, keep_best: {n, metric, mode}}``; a
            tier left out keeps every checkpoint.
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
        seed: Graph-level random seed; also seeds Keras 2's initializers and
            dropout made without a seed, so a run starts from the same weights
            every time.
        eval: Evaluation of serving checkpoints, see :class:`EvalConfig`
            (``null``: none; the only metric is then the training ``loss``).
        parameter_servers: ``ParameterServer`` actors that hold the embedding
            tables (every partitioned variable, and those ``ps_variables``
            names) with their optimizer slots, as job ``ps`` of the workers'
            TF cluster; 0 (the default) keeps every variable on every worker.
            See README: Tables bigger than a worker.
        ps_cpus: CPUs each parameter server asks Ray for (below 1, as with
            ``cpus_per_worker``, its idle TensorFlow threads sleep instead of
            spinning).
        ps_memory: Memory each parameter server asks Ray for, in bytes or as
            ``"8GiB"`` / ``"500MB"``; ``null``: none reserved.
        ps_resources: Ray custom resources each parameter server asks for,
            to place them (e.g. ``{ps_node: 1}`` on high-memory nodes).
        ps_variables: Regexes (``re.search``) of variable names (full names,
            as ``v.op.name``) that live on the servers besides the partitioned
            ones (a slot follows its variable); each must match a variable
            of the model.
    """

    model: str = "distributed.examples.digits:cnn_bn_model_fn"
    model_params: dict = dataclasses.field(default_factory=dict)
    input: Any = "distributed.examples.digits:digits_input_fn"
    input_params: dict = dataclasses.field(default_factory=dict)
    input_prefetch: int = 2
    input_position: Literal["exact", "restart"] = "exact"
    optimizer: Annotated[OptimizerConfig, OptimizerConfig.from_value] = \
        dataclasses.field(default_factory=OptimizerConfig)
    batch_size: int = 64
    steps: int = 500
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    storage: str = "runs"
    storage_options: dict = dataclasses.field(default_factory=dict)
    staging: str = ""  # "" = DEFAULT_STAGING (the temp dir's dtr-staging/)
    run: str = "digits-cnn"
    selection: Annotated[SelectionSpec, _selection] = dataclasses.field(
        default_factory=lambda: SelectionSpec("inference"))
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    retention: Annotated[dict[str, Retention], _retention] = dataclasses.field(
        default_factory=lambda: {"serving": Retention((KeepLastN(5),)),
                                 "full": Retention((KeepLastN(2),))})
    log_every: int = 50
    collective_timeout: float = 120.0
    max_failures: int = 3
    bucket_mib: float = 8.0
    sparse_density_threshold: float = 0.5
    steps_per_run: int = 1
    seed: int = 0
    eval: EvalConfig | None = None
    parameter_servers: int = 0
    ps_cpus: float = 1.0
    ps_memory: Annotated[int | None, parse_bytes] = None
    ps_resources: dict = dataclasses.field(default_factory=dict)
    ps_variables: Annotated[list, regex_list] = dataclasses.field(default_factory=list)

    @property
    def saves_input_position(self) -> bool:
        """Whether full checkpoints hold each worker's input position."""
        return self.input_position == "exact"

    def validate(self) -> "TrainConfig":
        """Checks every field; returns self. Raises :class:`ConfigError`."""
        check_ref(self.model, "model")
        check_input(self.input, "input")
        non_negative_int(self.input_prefetch, "input_prefetch")
        self.optimizer.validate("optimizer")
        self.checkpoint.validate("checkpoint")
        for field in ("batch_size", "steps", "workers", "log_every", "steps_per_run"):
            positive_int(getattr(self, field), field)
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker: expected >= 0, got {self.gpus_per_worker!r}")
        self._check_gpus()
        positive(self.cpus_per_worker, "cpus_per_worker")
        positive(self.collective_timeout, "collective_timeout")
        non_negative_int(self.max_failures, "max_failures")
        positive(self.bucket_mib, "bucket_mib")
        _check_density_threshold(self.sparse_density_threshold)
        uris.check_storage(self.storage)
        try:
            check_run_name(self.run)
        except ValueError as e:
            raise ConfigError(f"run: {e}") from None
        if self.eval is not None:
            self.eval.validate("eval", self.checkpoint.serving_every)
        if self.selection.serve_ema and self.optimizer.ema_decay is None:
            raise ConfigError("selection.serve_ema: needs optimizer.ema_decay (e.g. "
                              "0.999): without it there are no averages to serve")
        self._check_eval_metric_uses()
        self._check_parameter_servers()
        return self

    def _check_parameter_servers(self) -> None:
        """``parameter_servers`` and its ``ps_*`` fields (see README: Tables
        bigger than a worker)."""
        non_negative_int(self.parameter_servers, "parameter_servers")
        positive(self.ps_cpus, "ps_cpus")
        for key, amount in self.ps_resources.items():
            if not isinstance(key, str) or isinstance(amount, bool) or \
                    not isinstance(amount, (int, float)) or amount <= 0:
                raise ConfigError(f"ps_resources.{key}: expected a positive number of "
                                  f"a Ray resource, got {amount!r}")
        if self.parameter_servers == 0:
            for field in ("ps_variables", "ps_resources"):
                if getattr(self, field):
                    raise ConfigError(f"{field}: set, but parameter_servers is 0; set "
                                      "parameter_servers: N (e.g. 2) or drop it")
            return
        if uris.is_object_store(self.storage):
            raise ConfigError(
                f"parameter_servers: {self.parameter_servers} with storage "
                f"{self.storage!r}: the servers write and read their checkpoint "
                "shards on a filesystem path they share with the coordinator, and "
                "an object store is not one yet; use a shared directory (NFS) or "
                "parameter_servers: 0")
        if self.steps_per_run > 1:
            raise ConfigError(
                f"steps_per_run: {self.steps_per_run} with parameter_servers is not "
                "supported yet (rank 0 updates the servers once per Session.run); "
                "use steps_per_run: 1")
        if self.eval is not None:
            raise ConfigError(
                "eval: evaluation reads the serving checkpoint's values in the "
                "coordinator, which never holds the servers' tables; with "
                "parameter_servers evaluate the exported model instead (drop eval)")

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
        for field, metric in self.metric_uses():
            if metric.startswith("eval/"):
                raise ConfigError(
                    f"{field}: {metric} is recorded only when the config has an "
                    "eval block (eval: {input: ...}); add one or keep the best by loss")

    def metric_uses(self) -> list[tuple[str, str]]:
        """``(field, metric)`` for each recorded metric the config names
        (``eval.stop_when``, ``keep_best``), so each can be checked against
        what the run records once the model is built."""
        uses = []
        if self.eval is not None and self.eval.stop_when is not None:
            uses.append(("eval.stop_when.metric", self.eval.stop_when.metric))
        for tier, retention in self.retention.items():
            uses += [(f"retention.{tier}.keep_best.metric", rule.metric)
                     for rule in retention.rules if isinstance(rule, KeepBestN)]
        return uses

    @property
    def storage_path(self) -> str:
        """The local directory the checkpoint store writes: ``storage`` itself,
        or for an object store, its staging mirror under ``staging``."""
        return uris.local_path(self.storage, self.staging or None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON's types) that :func:`distributed.config.from_dict`
        turns back into an equal config."""
        data = dataclasses.asdict(self)
        data.update(optimizer=self.optimizer.to_dict(),
                    selection=json.loads(self.selection.to_json()),
                    retention={t: r.to_dict() for t, r in self.retention.items()})
        return data


def _check_density_threshold(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(
            f"sparse_density_threshold: expected a number >= 0 (e.g. 0.5: gather a "
            f"sparse gradient when its rows are at most half the dense bytes; 0: "
            f"always all-reduce densely), got {value!r}")
