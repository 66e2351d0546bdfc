"""The coordinator: owns the chief Session, the Savers, the commit protocol and
the catalog. One Ray actor per run (CPU only, no data).

It builds the same training graph as the workers (so names match), initializes
or resumes the variables, hands their values to every worker, and writes the
checkpoints rank 0 hands it: the values are loaded into the chief Session and
saved by the tier's sharded Saver, then committed and retention applied. The
run's :class:`~distributed.storage.runstore.RunStore` carries whatever a commit,
a deletion or a file needs on the run's storage (publishing, for an object
store); TensorBoard scalars are :mod:`~distributed.train.metrics`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from typing import Any, Mapping

import numpy as np

from distributed import logs
from distributed.checkpoint import layout
from distributed.checkpoint.layout import RUN_CONFIG_FILE
from distributed.config import TrainConfig, from_dict
from distributed.errors import ConfigError, user_code
from distributed.train.protocol import (EARLY_STOP, POSITIONS_GROUP, BuildPlan,
                                        CheckpointEvent, OpenedRun)


def remote_class(cls: type | None = None):
    """``cls`` (the :class:`Coordinator` or a subclass) as a Ray actor class:
    its methods run one at a time, but :meth:`Coordinator.put_position`,
    called with ``.options(concurrency_group=POSITIONS_GROUP)``, runs on a
    thread of its own, so a full save waiting for the workers' positions
    receives them."""
    import ray
    return ray.remote(concurrency_groups={POSITIONS_GROUP: 1})(cls or Coordinator)


class Coordinator:
    """Chief of one run. Wrapped with ``ray.remote`` by the trainer
    (:func:`remote_class`).

    NOTE: methods run one at a time (a Ray actor), so at most one save runs;
    only :meth:`put_position` runs beside them.
    """

    def __init__(self, config_dict: Mapping[str, Any], restarting: bool = False):
        from distributed.train import devices
        devices.hide_gpus()  # holds no GPU (the evaluator runs here too)
        self.config: TrainConfig = from_dict(config_dict)
        logs.setup_actor(self.config.run, "coordinator")
        self.restarting = restarting
        from distributed.storage.runstore import open_writer
        from distributed.train.metrics import RunMetrics
        cfg = self.config
        self.store = open_writer(cfg.storage, cfg.run, cfg.storage_options,
                                 cfg.staging or None)
        self.metrics = RunMetrics(self.store)
        self.evaluator = self.pipeline = None
        # The eval thread commits too: commits, retention and events in turn.
        self._commit_lock = threading.RLock()
        # Reader leases on checkpoint files that rank 0 still reads on the
        # parameter servers after open_run (a warm start's origin): see loaded.
        self._load_leases = contextlib.ExitStack()

    def build(self, input_spec=None, eval_dataset=None) -> BuildPlan:
        """Builds the chief graph, the selection and the writers; writes nothing.

        ``input_spec`` is given for a Ray Data input (worker 0's); otherwise
        the coordinator learns it from the input function itself.
        ``eval_dataset``: a Ray Data eval input's dataset, as the driver loaded it.
        """
        import tensorflow as tf

        from distributed.checkpoint.selection import describe_variables, select
        from distributed.checkpoint.writer import CheckpointWriter, session_config
        from distributed.train.devices import cpu_only
        from distributed.inputs import probe_spec
        from distributed.train.positions import InputPositions
        from distributed.train.graph import (VariableLoader, build_train_graph,
                                             never_updated_statistics, predict_reads)

        from distributed.train.ps import Placement
        cfg = self.config
        self.input_spec = input_spec if input_spec is not None else probe_spec(cfg)
        # Parameter servers: the chief graph only records where variables live
        # (its Session never holds the servers' variables).
        placement = Placement.of(cfg, place=False)
        self.tg = build_train_graph(cfg, self.input_spec, placement=placement)
        self.server_tasks = {v.op.name: placement.task_of(v)
                             for v in self.tg.server_variables}
        self.server_saver = None
        self.positions = InputPositions(self.tg.graph, cfg.workers) \
            if cfg.saves_input_position else None
        reads = predict_reads(cfg, self.input_spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            selection = select(describe_variables(self.tg.variables),
                               cfg.selection, reads)
            self._build_writers(selection, CheckpointWriter)  # ShardImbalanceWarning
        self.warnings = [str(w.message) for w in caught]
        stale = never_updated_statistics(self.tg, reads)
        if stale:
            self.warnings.append(
                f"the predict outputs read {', '.join(stale)}, but no op in "
                "UPDATE_OPS updates them, so they keep their initial values and "
                "serving would use those. A Keras model keeps its batch-norm "
                "updates on the model: call distributed.model.keras.add_model_updates("
                "model, inputs) after model(inputs, training=...) in model_fn "
                "(README: Keras 2 layers). Ignore this if they are frozen on "
                "purpose.")
        dense = placement.dense_gradient_warning() if placement is not None else None
        if dense:
            self.warnings.append(dense)
        shards = max(w.num_shards for w in self.writers.values())
        self.sess = tf.compat.v1.Session(graph=self.tg.graph,
                                         config=cpu_only(session_config(shards)))
        self.loader = VariableLoader(self._replicated())
        if cfg.eval is not None:
            self._build_evaluator(eval_dataset)
        return BuildPlan(
            input_spec=self.input_spec, serving_names=self.serving_names,
            num_variables=len(self.tg.variables), warnings=list(self.warnings),
            serving_bytes=self.writers["serving"].total_bytes,
            full_bytes=self.writers["full"].total_bytes,
            serving_tensors=self.writers["serving"].num_tensors,
            full_tensors=self.writers["full"].num_tensors)

    def _build_writers(self, selection, writer_cls) -> None:
        """The serving and full tiers' sharded writers."""
        from distributed.checkpoint.selection import checkpoint_sources
        cfg = self.config
        chosen = set(selection.names)
        by_name = {v.op.name: v for v in self.tg.variables}
        # Serving checkpoint name -> the variable saved under it (serve_ema: its
        # average). Rank 0 hands values over by variable name, never renamed.
        self.serving_sources = checkpoint_sources(
            [n for n in by_name if n in chosen], self.tg.averages,
            cfg.selection.serve_ema)
        self.serving_names = list(dict.fromkeys(self.serving_sources.values()))
        self.writers = {
            "serving": writer_cls(
                {c: by_name[n] for c, n in self.serving_sources.items()},
                num_shards=cfg.checkpoint.shards, **self._servers_arg()),
            "full": writer_cls(self.tg.variables + (self.positions.variables if
                                                    self.positions else []),
                               num_shards=cfg.checkpoint.shards, **self._servers_arg()),
        }

    def _servers_arg(self) -> dict:
        """The writers' ``servers`` argument, only with parameter servers."""
        return {"servers": self.server_tasks} if self.server_tasks else {}

    def _replicated(self) -> list:
        """The variables this Session holds: all but the parameter servers'."""
        return [v for v in self.tg.variables if v.op.name not in self.server_tasks]

    def connect_servers(self, servers: list[str]) -> None:
        """With parameter servers (``host:port`` by task): a TF client of them
        that has them write their variables' snapshots into checkpoints."""
        from distributed.train.ps import ServerSaver
        if not self.server_tasks:
            return
        self.server_saver = ServerSaver({tier: w.server_entries
                                         for tier, w in self.writers.items()})
        self.server_saver.connect(servers)
        for tier, writer in self.writers.items():
            writer.attach_servers(
                lambda directory, tier=tier: self.server_saver.write(tier, directory))

    def loaded(self) -> None:
        """Every worker has loaded, rank 0 restored the servers' variables
        (:meth:`server_checkpoint`): gives back the reader leases held on
        another run's files for that read."""
        self._load_leases.close()

    def server_checkpoint(self) -> str | None:
        """The prefix of the full checkpoint training resumes from, whose
        parameter-server tensors rank 0 restores on the servers; ``None``:
        a fresh start (rank 0 runs their initializers)."""
        return self._resumed_prefix

    def _build_evaluator(self, eval_dataset=None) -> None:
        from distributed.train.evaluation import Evaluator
        cfg = self.config
        self.evaluator = Evaluator(cfg, list(self.serving_sources), eval_dataset)
        known = self.evaluator.metric_names()
        for field, metric in cfg.metric_uses():
            if metric.startswith("eval/") and metric not in known:
                raise ConfigError(
                    f"{field}: {metric} is not recorded; evaluation records "
                    f"{', '.join(known)} (eval_metrics of the model_fn in eval mode)")
        missing = [n for n in self.evaluator.missing if n != "global_step"]
        if missing:
            self.warnings.append(
                f"evaluation reads {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}, which serving checkpoints "
                "do not hold, so it uses their initial values (as serving would); "
                "widen the selection if that is not intended")

    def open_run(self) -> OpenedRun:
        """Opens the run's storage, initializes or resumes the variables and
        records the run; returns where training starts.

        NOTE: called only after :meth:`build` and the trainer's check of every
        worker's input, so a run whose model or input is wrong leaves nothing
        in storage.
        """
        self.removed = self.store.open()
        self._resumed_prefix = None
        start_step, resumed = self._init_or_resume()
        lost = self._lost_serving(start_step) if resumed is not None else None
        recreated = remake = None
        if lost is not None and self.server_tasks:
            # The tables are restored after this, on the servers, by rank 0,
            # which then re-makes it (Worker.load).
            remake = lost
        elif lost is not None:  # the chief Session holds the restored values
            self._commit(lost, "serving")
            recreated = lost
        self._write_run_config()
        if self.evaluator is not None:
            from distributed.train.evaluation import EarlyStop, EvalPipeline
            rule = self.config.eval.stop_when
            self.early_stop = rule and EarlyStop(rule.metric, rule.mode, rule.patience)
            if self.early_stop:  # a restarted or resumed run goes on counting
                for entry in self.store.catalog.entries("serving"):
                    if entry.step <= start_step:
                        self.early_stop.observe(entry.step, entry.metrics)
            self.pipeline = EvalPipeline(self.evaluator.evaluate, self._commit_evaluated)
        return OpenedRun(start_step=start_step, resumed_from=resumed,
                         recreated_serving=recreated, remake_serving=remake,
                         warnings=list(self.warnings), removed=list(self.removed))

    def _lost_serving(self, step: int) -> int | None:
        """``step`` if the serving checkpoint due at the resume step is missing.

        Rank 0 hands both tiers of a step to the coordinator; if it dies in
        between, the full checkpoint may commit and the serving one be lost,
        and training resumes after that step, so it is written again from the
        restored values (see :meth:`open_run`).
        """
        from distributed.train.schedule import CheckpointSchedule
        cfg = self.config
        due = CheckpointSchedule(cfg.checkpoint.serving_every, cfg.checkpoint.full_every,
                                 cfg.steps).due(step)
        if step == 0 or "serving" not in due or \
                (step, "serving") in self.store.catalog.committed_keys():
            return None
        return step

    def _commit(self, step: int, tier: str, metrics: Mapping[str, float] | None = None,
                commit: bool = True):
        """Writes and commits (``commit``: else only writes) the chief
        Session's values as the tier's checkpoint; returns the catalog entry."""
        selection = (self.config.selection.to_json() if tier == "serving"
                     else '{"policy": "all"}')
        return self.store.save(self.writers[tier], self.sess, step, tier, selection,
                               metrics, commit=commit)

    def _init_or_resume(self) -> tuple[int, int | None]:
        """Initializes the variables, or restores the newest full checkpoint
        that verifies (older ones are tried when newer ones are corrupt)."""
        from distributed.errors import CheckpointCorruptError, ManifestError
        init = self.tg.initializers
        self.sess.run(init.init_op)
        fulls = sorted(self.store.catalog.entries("full"), key=lambda e: -e.step)
        if not fulls:
            if self.store.catalog.committed_keys() and not self.restarting:
                raise ConfigError(
                    f"run: {self.config.run!r} already has checkpoints under "
                    f"{self.store.layout.root} but no full checkpoint to resume "
                    "from; pick a new --run name or delete that directory")
            return self._start_fresh(init), None
        for entry in fulls:
            try:
                self.store.fetch("full", entry.step)
                self.store.verify(entry.step, "full")
            except (CheckpointCorruptError, ManifestError) as e:
                where = self.store.quarantine(entry.step, "full", str(e))
                self.warnings.append(
                    f"full checkpoint at step {entry.step} does not verify ({e}); "
                    f"moved it out of the catalog to {where} and trying the one "
                    "before it")
                continue
            self._restore_full(os.path.join(self.store.checkpoint_dir(entry),
                                            layout.CKPT_PREFIX))
            self.sess.run(init.local_init_op)
            restored = int(self.sess.run(self.tg.global_step))
            if restored != entry.step:
                raise ConfigError(
                    f"run: the full checkpoint of run {self.config.run!r} at step "
                    f"{entry.step} holds global_step {restored}, so resuming would "
                    f"restart the step count (and any schedule) at {restored}; the "
                    "optimizer that trained it did not advance global_step. Fix the "
                    "optimizer (see README: Optimizers) and start a new --run")
            return restored, entry.step
        raise ConfigError(
            f"run: none of the {len(fulls)} full checkpoint(s) of run "
            f"{self.config.run!r} verifies, so it cannot resume ("
            + "; ".join(self.warnings[-len(fulls):]) + "); start a new --run")

    def _restore_full(self, prefix: str) -> None:
        """Restores the variables this Session holds from the full checkpoint
        at ``prefix`` and, with ``input_position: exact``, the input positions
        it holds; the parameter servers' variables are restored on the servers
        by rank 0 from the same files (:meth:`server_checkpoint`)."""
        import tensorflow as tf
        with self.tg.graph.as_default():
            # A list, not {name: variable}: a partitioned variable's parts
            # then restore from its logical tensor's slices, as saved.
            saver = tf.compat.v1.train.Saver(var_list=self._replicated())
            saver.restore(self.sess, prefix)
        self._resumed_prefix = prefix
        if self.positions is not None:  # the input goes on where it stood
            note = self.positions.read(prefix)
            if note:
                self.warnings.append(note)

    def _start_fresh(self, init) -> int:
        """A run without a full checkpoint starts here (the global initializer
        has run): the scaffold's ``init_fn``, then the local initializers.
        Returns the step it starts at. A run started from elsewhere overrides
        it (:mod:`distributed.tune.warmstart`: another run's full checkpoint)."""
        if init.init_fn is not None:  # the scaffold's, on a fresh start only
            with user_code("model", f"{self.config.model} (its scaffold's init_fn)"):
                init.init_fn(self.sess)
        self.sess.run(init.local_init_op)
        return 0

    def _write_run_config(self) -> None:
        record = {"config": self.config.to_dict(),
                  "input_spec": self.input_spec.to_json()}
        path = os.path.join(self.store.layout.root, RUN_CONFIG_FILE)
        layout.atomic_write_bytes(path, json.dumps(record, indent=2).encode())
        self.store.put_file(RUN_CONFIG_FILE)

    def input_positions(self) -> list[bytes] | None:
        """Each worker's input position (by rank) from the resumed full
        checkpoint; ``None``: every worker reads its input from the start."""
        return self.positions.resumed if self.positions is not None else None

    def put_position(self, step: int, rank: int, position: bytes) -> None:
        """A worker's input position at a full checkpoint's step (rank 0 hands
        its own with the save, which waits for the others). Called in the
        ``positions`` concurrency group, beside a save."""
        self.positions.put(step, rank, position)

    def initial_values(self) -> dict[str, np.ndarray]:
        """Every variable's value, for the workers to start from."""
        return self.sess.run({v.op.name: v for v in self._replicated()})

    def save(self, step: int, tier: str, values: Mapping[str, np.ndarray],
             metrics: Mapping[str, float], position: bytes | None = None,
             release_servers: bool = False) -> CheckpointEvent:
        """See :meth:`_save`; ``release_servers``: the last tier of the step,
        after which the parameter servers free their snapshot."""
        try:
            return self._save(step, tier, values, metrics, position)
        finally:
            if release_servers and self.server_saver is not None:
                self.server_saver.release()

    def _save(self, step: int, tier: str, values: Mapping[str, np.ndarray],
              metrics: Mapping[str, float],
              position: bytes | None = None) -> CheckpointEvent:
        """Loads rank 0's values into the chief Session, writes and commits.

        A full checkpoint also holds every worker's input position at
        ``step``: rank 0's is ``position``, the others' came by
        :meth:`put_position`.

        A step redone after a restart keeps the checkpoint committed before it
        (committed checkpoints are immutable) and says so in the result.
        """
        from distributed.errors import StorageError
        logs.set_step(step)
        if (step, tier) in self.store.catalog.committed_keys():
            if tier == "full" and self.positions is not None:
                self.positions.drop_through(step)
            return CheckpointEvent.committed(
                self.store.catalog.get(step, tier).to_json_dict(), already_committed=True)
        if tier == "full" and self.positions is not None and position is not None:
            # The other workers' positions come by put_position.
            self.positions.wait(step, self.config.collective_timeout / 2)
        self.loader.load(self.sess, values)
        if tier == "full" and self.positions is not None:
            self.positions.load(self.sess, step, position)
        evaluate = tier == "serving" and self._eval_due(step)
        try:
            with self._commit_lock:
                entry = self._commit(step, tier, metrics, commit=not evaluate)
        except StorageError:
            self.record(step, {f"checkpoint/{tier}/failed_saves": 1.0})
            raise
        if evaluate:  # committed by the eval thread, with its metrics
            # Evaluated as served: under the checkpoint's names (serve_ema).
            self.pipeline.submit(entry, {c: values[n] for c, n in
                                         self.serving_sources.items()}, dict(metrics))
            return CheckpointEvent.committed(entry.to_json_dict(), evaluating=True)
        return CheckpointEvent.committed(
            entry.to_json_dict(),
            retention_deleted=tuple(e.step for e in self._after_commit(entry)))

    def _eval_due(self, step: int) -> bool:
        every = self.config.eval.every if self.pipeline is not None else None
        return self.pipeline is not None and (
            every is None or step % every == 0 or step == self.config.steps)

    def _commit_evaluated(self, entry, metrics: Mapping[str, float]) -> None:
        """The eval thread: commits a serving checkpoint with its metrics."""
        with self._commit_lock:
            entry = self.store.commit(entry, metrics)
            deleted = self._after_commit(entry)
            self.record(entry.step, {k: v for k, v in entry.metrics.items()
                                     if k.startswith("eval/")})
        if self.pipeline is not None:
            self.pipeline.events.append(CheckpointEvent.committed(
                entry.to_json_dict(), retention_deleted=tuple(e.step for e in deleted)))
            why = self.early_stop and self.early_stop.observe(entry.step, entry.metrics)
            if why:
                self.pipeline.events.append(CheckpointEvent(EARLY_STOP, entry.step,
                                                            reason=why))

    def _after_commit(self, entry) -> list:
        """Retention and the commit's TensorBoard scalars; the deleted entries."""
        tier = entry.tier
        with self._commit_lock:
            deleted = self.store.apply_retention(self.config.retention[tier], tier) \
                if tier in self.config.retention else []
            self.record(entry.step, {
                f"checkpoint/{tier}/save_seconds": entry.save_seconds,
                f"checkpoint/{tier}/bytes": float(entry.num_bytes),
                f"checkpoint/{tier}/shards": float(entry.num_shards),
                f"checkpoint/{tier}/write_MiB_per_sec":
                    entry.num_bytes / 2**20 / max(entry.save_seconds, 1e-9)})
        return deleted

    def poll(self) -> list[CheckpointEvent]:
        """The evaluation events since the last poll (commits, skips, failures)."""
        if self.pipeline is None:
            return []
        events, self.pipeline.events = self.pipeline.events, []
        return events

    def record(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes scalars to the run's TensorBoard event files
        (``<storage>/<run>/tensorboard/``)."""
        with self._commit_lock:
            self.metrics.record(step, scalars)

    def close(self) -> None:
        """The end of a run: every evaluation done and committed, the last
        TensorBoard events published with the run."""
        if self.pipeline is not None:
            self.pipeline.drain()
        with self._commit_lock:
            self.metrics.publish(force=True)

    def entries(self) -> list[dict[str, Any]]:
        return [e.to_json_dict() for e in self.store.catalog.entries()]
