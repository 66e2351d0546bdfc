"""A data-parallel training worker: one Ray actor, one TF graph and Session.

Each worker starts a TF server for the collective runtime, builds the training
graph with gradients all-reduced by ``CollectiveReduceV2`` (see
:mod:`distributed.train.collective`), loads the coordinator's initial values
and runs steps on its own shard of the input.

Rank 0 also checkpoints, off the training path: at a checkpoint step it takes
an in-graph snapshot of the variables to save (see
:mod:`distributed.train.snapshot`: on CPU no bytes are copied then, the next
step's updates are copy-on-write). A background thread then reads the snapshot
and hands the arrays to the coordinator through the Ray object store while
training goes on.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from distributed import logs
from distributed.config import TrainConfig, from_dict
from distributed.errors import ConfigError, LossDivergedError, last_line
from distributed.train.protocol import (FAILED, POSITIONS_GROUP, SKIPPED,
                                        CheckpointEvent, CoordinatorLostError,
                                        RoundReport, WorkerSetup)
from distributed.train.schedule import BusyPolicy, CheckpointSchedule

log = logging.getLogger(__name__)


class _AsyncCheckpointer:
    """Rank 0's side of async saving: snapshot, hand off, one save in flight.

    NOTE: only rank 0 creates one.
    """

    def __init__(self, coordinator, sess, variables, serving_names, config: TrainConfig,
                 run_options=None, on_servers=()):
        from distributed.train.snapshot import VariableSnapshot
        self._coordinator = coordinator
        self._sess = sess
        self._run_options = run_options
        # Parameter servers' variables: snapshot there, saved by the servers.
        self._on_servers = frozenset(on_servers)
        # "full" holds every variable, so when both tiers are due it serves both.
        self._snapshot = VariableSnapshot(variables, {
            "serving": serving_names, "full": [v.op.name for v in variables]},
            remote=self._on_servers)
        self._schedule = CheckpointSchedule(config.checkpoint.serving_every,
                                            config.checkpoint.full_every, config.steps)
        self._policy = BusyPolicy(config.checkpoint.on_busy)
        # While rank 0 waits, the other workers wait in the next all-reduce;
        # waiting longer than this would time it out and restart the group.
        self._max_wait = config.collective_timeout / 2
        self._thread: threading.Thread | None = None
        self._thread_error: str | None = None
        self._refs: list = []
        self.events: list[CheckpointEvent] = []
        self.stall_seconds = 0.0

    def _in_flight(self) -> bool:
        import ray
        if self._thread is not None and self._thread.is_alive():
            return True
        if self._refs:
            ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
            if len(ready) == len(self._refs):
                self._collect()
                return False
            return True
        return False

    def _wait(self, seconds: float) -> bool:
        """Waits up to ``seconds`` for the saves in flight; True if all are done."""
        import ray
        deadline = time.monotonic() + seconds
        if self._thread is not None:
            self._thread.join(seconds)
            if self._thread.is_alive():
                return False
        if self._refs:
            left = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=left)
            if len(ready) < len(self._refs):
                return False
        self._collect()
        return True

    def _collect(self) -> None:
        import ray
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._thread_error is not None:
            self.events.append(CheckpointEvent(FAILED, error=self._thread_error))
            self._thread_error = None
        refs, self._refs = self._refs, []
        for ref in refs:
            try:
                self.events.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                raise CoordinatorLostError(
                    f"the coordinator died during a save: {_short(e)}") from None
            except Exception as e:  # a failed save must not stop training
                self.events.append(CheckpointEvent(FAILED, error=_short(e)))

    def maybe_save(self, step: int, metrics: Mapping[str, float],
                   position: bytes | None = None, tiers: Sequence[str] = ()) -> None:
        """Saves the tiers due at ``step`` (or ``tiers``); ``position``: this
        worker's input position at ``step``, for a full checkpoint (the other
        workers hand theirs to the coordinator, which keeps them for the save)."""
        tiers = list(tiers) or self._schedule.due(step)
        if not tiers:
            return
        start = time.perf_counter()
        final = step == self._schedule.last_step
        decision = self._policy.decide(self._in_flight(), final)
        if decision == "skip":
            self.events.append(CheckpointEvent(SKIPPED, step, tiers=tuple(tiers)))
            return
        if decision == "wait" and final:
            # The other workers are done; the last saves queue behind the one
            # in flight and finish() collects them all.
            if self._thread is not None:
                self._thread.join()
            if self._on_servers:  # the save in flight still reads (then frees)
                self._collect()   # the servers' shadows the next take replaces
        elif decision == "wait" and not self._wait(self._max_wait):
            self.events.append(CheckpointEvent(
                SKIPPED, step, tiers=tuple(tiers),
                reason=f"the previous save was still being written after "
                       f"{self._max_wait:.0f}s (half of collective_timeout; "
                       "waiting longer would time out the other workers' "
                       "all-reduce)"))
            self.stall_seconds += time.perf_counter() - start
            return
        group = "full" if "full" in tiers else "serving"
        self._snapshot.take(self._sess, group, self._run_options)
        refs = self._refs
        metrics = dict(metrics)

        def hand_off():
            try:
                values = self._snapshot.fetch(self._sess, group, self._run_options)
                for tier in tiers:
                    names = [n for n in self._snapshot.groups[tier]
                             if n not in self._on_servers]
                    release = {"release_servers": tier == tiers[-1]} \
                        if self._on_servers else {}
                    refs.append(self._coordinator.save.remote(
                        step, tier, {n: values[n] for n in names}, metrics,
                        position if tier == "full" else None, **release))
            except Exception as e:  # reported as a failed save by _collect
                self._thread_error = f"step {step}: reading the snapshot failed: " \
                    f"{_short(e)}"

        self._thread = threading.Thread(target=hand_off, daemon=True)
        self._thread.start()
        self.stall_seconds += time.perf_counter() - start

    def flush(self) -> None:
        self._collect()

    def drain_events(self) -> list[CheckpointEvent]:
        events, self.events = self.events, []
        return events


class Worker:
    """One data-parallel replica. Wrapped with ``ray.remote`` by the trainer.

    Args:
        config_dict: The run config as a dict.
        rank: This worker's index in ``[0, num_workers)``.
    """

    def __init__(self, config_dict: Mapping[str, Any], rank: int):
        self.config = from_dict(config_dict)
        self.rank = rank
        logs.setup_actor(self.config.run, f"worker {rank}")
        from distributed.train.collective import pick_free_port
        import ray
        self._address = f"{ray.util.get_node_ip_address()}:{pick_free_port()}"
        self._checkpointer: _AsyncCheckpointer | None = None
        self._coordinator = None
        self._step_checked = False  # the optimizer contract, after the first run
        importlib.import_module("tensorflow")  # import while the coordinator builds

    def address(self) -> str:
        return self._address

    def setup(self, addresses: list[str], split: Any = None,
              servers: list[str] | None = None) -> WorkerSetup:
        """Starts the TF server and builds the input, graph and Session.

        The input spec comes from this worker's own input (its first batch, or
        its dataset's element spec), so setup runs while the coordinator
        prepares. ``split`` is the group's Ray Data feeder (Ray Data input
        only; :mod:`distributed.inputs.raystream`). ``servers``: the parameter
        servers' ``host:port`` by task.
        """
        import functools

        import tensorflow as tf

        from distributed import inputs
        from distributed.train import collective, devices
        from distributed.train.graph import VariableLoader, build_train_graph

        cfg = self.config
        gpu = cfg.gpus_per_worker > 0
        if gpu:  # one line naming this node, not a placement error at init
            devices.check_this_worker(cfg.gpus_per_worker)
        else:  # a CPU worker on a GPU node leaves the GPUs to the GPU workers
            devices.hide_gpus()
        self.spec = collective.GroupSpec(
            addresses=tuple(addresses), rank=self.rank,
            timeout_seconds=cfg.collective_timeout, servers=tuple(servers or ()))
        from distributed.train.ps import Placement
        placement = Placement.of(cfg, rank=self.rank, spec=self.spec) \
            if servers else None
        base = devices.thread_config(max(1, int(cfg.cpus_per_worker + 0.999)), 2,
                                     cfg.cpus_per_worker)
        if not gpu:
            base = devices.cpu_only(base)
        self.server = collective.start_server(self.spec, base)
        reduce_fn = functools.partial(
            collective.allreduce_gradients, spec=self.spec,
            bucket_bytes=int(cfg.bucket_mib * 2**20),
            sparse_density_threshold=cfg.sparse_density_threshold,
            batch_size=cfg.batch_size)
        self.tg = build_train_graph(
            cfg, lambda: inputs.open_source(cfg, self.rank, split, gpu=gpu),
            reduce_fn=reduce_fn, device="/device:GPU:0" if gpu else None,
            steps_per_run=cfg.steps_per_run, placement=placement)
        self.source = self.tg.source
        self.sess = tf.compat.v1.Session(
            self.server.target, graph=self.tg.graph,
            config=collective.session_config(self.spec, base))
        self.run_options = collective.run_options(self.spec)
        self.tg.initializers.run(self.sess)
        self.source.start(self.sess)
        self._exact_input = cfg.saves_input_position
        self._position_fetch = None
        if self._exact_input:  # a pipeline that cannot be saved: one line, now
            self.source.check_position(self.sess)
            self._position_fetch = self._build_position_fetch()
        on_servers = {v.op.name for v in self.tg.server_variables}
        self.loader = VariableLoader([v for v in self.tg.variables
                                      if v.op.name not in on_servers])
        self._server_restorer = None
        if on_servers and self.rank == 0:  # restore ops placed on the servers
            from distributed.train.ps import restorer
            with self.tg.graph.as_default():
                self._server_restorer = restorer(self.tg.server_variables)
        # Every worker ends its runs at the same steps (the collectives pair up).
        self._schedule = CheckpointSchedule(cfg.checkpoint.serving_every,
                                            cfg.checkpoint.full_every, cfg.steps)
        return WorkerSetup(os.getpid(), self.source.spec)

    def load(self, values: Mapping[str, np.ndarray], step: int,
             serving_names: list[str] | None = None, coordinator=None,
             positions: list | None = None,
             server_checkpoint: str | None = None,
             remake_serving: int | None = None) -> list[CheckpointEvent]:
        """Loads every variable's value (identical on all replicas) and, from
        a resumed full checkpoint, this worker's input position (``positions``:
        one per rank, or ``None`` to read the input from its beginning).

        NOTE: rank 0 also gets the serving selection, and from then on
        checkpoints; every worker hands its input positions to the coordinator.
        With parameter servers rank 0 also initializes their variables, or
        restores them from ``server_checkpoint`` (a full checkpoint's prefix),
        in place on the servers, which read the files themselves, and then
        writes the serving checkpoint at step ``remake_serving`` that a failure
        lost (the coordinator re-makes it where it holds every value); returns
        that save's checkpoint events.
        """
        self.loader.load(self.sess, values)
        if self._server_restorer is not None:
            if server_checkpoint is None:
                self.sess.run(self.tg.server_init_op)
                self._warm_start_servers()
            else:
                with self.tg.graph.as_default():  # not Saver's eager path
                    self._server_restorer.restore(self.sess, server_checkpoint)
        self.step = step
        self._coordinator = coordinator
        if positions is not None and self._exact_input:
            self.source.restore_position(self.sess, positions[self.rank])
        if self.rank == 0 and coordinator is not None:
            self._checkpointer = _AsyncCheckpointer(
                coordinator, self.sess, self.tg.variables, serving_names or [],
                self.config, self.run_options,
                on_servers=[v.op.name for v in self.tg.server_variables])
            if remake_serving is not None:
                # A serving checkpoint lost with a failure, of the values just
                # restored (with parameter servers only they hold the tables).
                self._checkpointer.maybe_save(remake_serving, {}, tiers=("serving",))
                self._checkpointer.flush()
                return self._checkpointer.drain_events()
        return []

    def _warm_start_servers(self) -> None:
        """Rank 0, on a fresh start with parameter servers: the scaffold's
        ``init_fn`` (a warm start) once more, in this Session, where it also
        writes the servers' variables (the coordinator's run of it set only
        its own copies, which the servers never read). This rank's replicated
        variables get the values the coordinator handed every rank again."""
        init = self.tg.initializers
        if init is None or init.init_fn is None:
            return
        from distributed.errors import user_code
        with user_code("model", f"{self.config.model} (its scaffold's init_fn, on "
                                "the parameter servers' variables)"):
            init.init_fn(self.sess)

    def train(self, until_step: int) -> RoundReport:
        """Runs steps up to ``until_step``; returns the round's report (rank 0's
        carries its checkpoint events)."""
        import tensorflow as tf
        losses: list[float] = []
        start = time.perf_counter()
        first = self.step
        learning_rate = None
        while self.step < until_step:
            end = self._schedule.run_end(self.step, until_step, self.tg.steps_per_run)
            # The round's last run also reads the learning rate its last step used.
            take_position = self._position_due(end)
            try:
                run_losses, rate, position = self._run(
                    end - self.step, end == until_step, take_position)
            except tf.errors.OutOfRangeError:
                raise self.source.ended(self.step) from None
            except tf.errors.OpError as e:
                self._raise_if_users(e, end)
                from distributed.train.op_errors import picklable
                raise picklable(e) from None
            learning_rate = rate if rate is not None else learning_rate
            for loss in run_losses:
                self.step += 1
                if not np.isfinite(loss):
                    if self._checkpointer is not None:
                        self._checkpointer.flush()  # let the in-flight save commit
                    raise LossDivergedError(
                        f"loss became {loss} at step {self.step} on worker {self.rank}; "
                        "lower optimizer.learning_rate or check the input. The "
                        "checkpoints committed before it are kept (none of NaN "
                        "values is saved).")
                losses.append(float(loss))
            logs.set_step(self.step)
            if not self._step_checked:
                self._check_global_step()
            if take_position and position is None:  # a Python input: a count
                position = self.source.position(self.sess)
            if self._checkpointer is not None:
                self._checkpointer.maybe_save(self.step, {"loss": losses[-1]}, position)
            elif position is not None and self._coordinator is not None:
                self._coordinator.put_position.options(
                    concurrency_group=POSITIONS_GROUP).remote(self.step, self.rank, position)
        seconds = time.perf_counter() - start
        checkpointer = self._checkpointer
        return RoundReport(
            step=self.step, loss=float(np.mean(losses)) if losses else None,
            steps_per_sec=(self.step - first) / seconds if seconds > 0 else 0.0,
            learning_rate=learning_rate,
            events=tuple(checkpointer.drain_events()) if checkpointer else (),
            stall_seconds=checkpointer.stall_seconds if checkpointer else None)

    def _position_due(self, step: int) -> bool:
        """Whether this worker's input position goes into a full checkpoint
        at ``step`` (runs end at checkpoint steps, so a position taken at the
        end of the run holds nothing of a later step)."""
        return self._exact_input and "full" in self._schedule.due(step)

    def _build_position_fetch(self):
        """A ``tf.data`` input's position as a tensor fetched in the run that
        ends at a full checkpoint's step (no run of its own; it serializes
        beside the step): after the step's reads of the iterator, or after
        the in-graph loop of ``steps_per_run``. ``None`` for other inputs."""
        position_after = getattr(self.source, "position_after", None)
        if position_after is None:
            return None
        import tensorflow as tf
        tg = self.tg
        after = [tg.loss] if tg.steps_per_run > 1 else \
            tf.nest.flatten((tg.features, tg.labels))
        with tg.graph.as_default():
            return position_after(after)

    def _raise_if_users(self, error: Exception, end: int) -> None:
        """Raises :class:`StepError` when ``error`` came from the user's ops
        (not retried); returns for infrastructure errors (a dead peer)."""
        from distributed.train.op_errors import user_op_error
        steps = (f"step {end}" if end == self.step + 1 else
                 f"steps {self.step + 1}..{end}")
        step_error = user_op_error(error, self.tg.graph, f"{steps} on worker {self.rank}")
        if step_error is None:
            return
        if self._checkpointer is not None:
            try:
                self._checkpointer.flush()  # let the in-flight save commit
            except Exception:  # the step's error is the news, not this one
                pass
        raise step_error from None

    def _check_global_step(self) -> None:
        """The optimizer contract: ``global_step`` advanced by one per step.

        Checked once, after this worker's first run of steps; an optimizer
        whose ``apply_gradients`` ignores ``global_step`` would leave every
        schedule at step 0 and resume from 0.
        """
        self._step_checked = True
        value = int(self.sess.run(self.tg.global_step))
        if value == self.step:
            return
        name = self.config.optimizer.name
        raise ConfigError(
            f"optimizer: {name} did not advance global_step ({value} after step "
            f"{self.step}), so learning-rate schedules, checkpoint steps and resuming "
            "would all count from the wrong step; its apply_gradients must increment "
            "the global_step it is given (tf.compat.v1.train optimizers do): return "
            "distributed.train.optimizers.advancing_global_step(optimizer) from "
            "your optimizer function, or fix its apply_gradients")

    def _run(self, n: int, read_rate: bool, take_position: bool = False
             ) -> tuple[list[float], float | None, bytes | None]:
        """``n`` steps in one ``Session.run`` (one, or an in-graph loop of
        ``steps_per_run``); returns each step's loss, with ``read_rate`` the
        learning rate the last step used, and with ``take_position`` a
        ``tf.data`` input's position after the last step (else ``None``)."""
        tg = self.tg
        fetches = {"train": tg.train_op, "loss": tg.loss}
        if read_rate and tg.learning_rate is not None:
            fetches["rate"] = tg.learning_rate
        if take_position and self._position_fetch is not None:
            fetches["position"] = self._position_fetch
        if tg.steps_per_run > 1:
            feed = self.source.feed_steps(self.step, n) or {}
            feed[tg.steps] = n
            out = self.sess.run(fetches, feed, options=self.run_options)
            losses = [float(x) for x in out["loss"]]
        else:
            out = self.sess.run(fetches, self.source.feed(self.step),
                                options=self.run_options)
            losses = [float(out["loss"])]
        rate = out.get("rate")
        return losses, None if rate is None else float(rate), out.get("position")

    def finish(self) -> list[CheckpointEvent]:
        """Rank 0, after the last step: waits for the saves in flight; returns
        their events. (Not part of :meth:`train`, whose rounds the trainer
        expects to end together on every worker.)"""
        if self._checkpointer is None:
            return []
        self._checkpointer.flush()
        return self._checkpointer.drain_events()

    def variables(self) -> dict[str, np.ndarray]:
        """Every variable's value (for tests of replica identity)."""
        return self.sess.run({v.op.name: v for v in self.tg.variables})


def _short(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    return last_line(cause if cause is not None else e)
