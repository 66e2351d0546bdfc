"""One attempt of a worker group, as the driver runs it.

An attempt starts a coordinator and the workers, checks they built the same
input before anything is written, opens the run (fresh, resumed, or
restarted after a failure), trains in rounds of ``log_every`` steps, and
waits for the last saves and evaluations. Whatever stops it early is raised
as :class:`~distributed.train.failures.GroupFailure` or as the user's own
error; :mod:`distributed.train.trainer` decides what comes next.
"""

from __future__ import annotations

import time
from typing import Any, NoReturn, Sequence

from distributed import logs
from distributed.config import TrainConfig
from distributed.errors import ConfigError, DistributedError
from distributed.progress import StatusLine
from distributed.train.cluster import COORDINATOR_CPUS
from distributed.train.failures import GroupFailure, classify, unwrap, user_error_among
from distributed.train.hooks import RunHooks
from distributed.train.protocol import (COMMITTED, EARLY_STOP, BuildPlan, CheckpointEvent,
                                        OpenedRun, RoundReport)
from distributed.train.report import format_summary


class GroupRun:
    """The driver's side of a run across attempts: the step reached, the
    events and rounds reported, the restarts. :meth:`attempt` starts one group
    of actors (coordinator + workers) and trains with it."""

    def __init__(self, config: TrainConfig, echo, coordinator_cls, t0: float,
                 actor_env: dict | None, dataset=None, eval_dataset=None,
                 hooks: RunHooks | None = None):
        self.config = config
        self.hooks = hooks or RunHooks()  # a caller's (a Tune trial's) additions
        self.dataset = dataset  # Ray Data input: a new feeder for every group
        self.eval_dataset = eval_dataset  # Ray Data eval input: the coordinator's
        self.actor_env = actor_env  # None: the actors inherit the driver's
        self.status = StatusLine()
        self.echo = self.status.wrap(echo)
        self.waiting_for = "starting the actors"
        self.coordinator_cls = coordinator_cls
        self.t0 = t0
        self.step = 0
        self.events: list[CheckpointEvent] = []
        self.rounds: list[RoundReport] = []  # rank 0's report of every round
        self.restarts = 0
        self.stop_reason: str | None = None  # eval.stop_when said stop
        self.first_step_at: float | None = None
        self._poll_ref = None  # the coordinator's evaluation poll in flight
        # The group of the current attempt.
        self._coordinator = None
        self._workers: list = []
        self._worker_names: list[str] = []
        self._feeder = None  # the group's Ray Data feeder (Ray Data input only)
        self._servers: list = []  # parameter servers (parameter_servers > 0)

    def attempt(self, restarting: bool) -> dict[str, Any]:
        """Trains to ``config.steps`` (or an early stop) with a new group;
        returns the run's summary. The actors are stopped however it ends."""
        import ray
        coordinator, workers = self._start_actors(restarting)
        try:
            return self._train_with_group(restarting)
        finally:
            feeder, self._feeder = self._feeder, None
            for actor in [coordinator] + workers + self._servers + \
                    ([feeder] if feeder else []):
                ray.kill(actor, no_restart=True)

    def _train_with_group(self, restarting: bool) -> dict[str, Any]:
        """The phases of an attempt, in order, with the group just started."""
        built = self._handshake()
        opened = self._open(restarting)
        self._load(built, opened, restarting)
        step = self._train_rounds(opened.start_step)
        entries = self._shut_down()
        self.echo(format_summary(self.config, entries))
        return {"run": self.config.run, "steps": step, "entries": entries,
                "early_stop": self.stop_reason,
                "events": self.events, "rounds": self.rounds,
                "first_step_seconds": self.first_step_at,
                "seconds": time.perf_counter() - self.t0}

    def _start_actors(self, restarting: bool) -> tuple[Any, list]:
        """A new coordinator and ``config.workers`` workers (no call made yet)."""
        import ray

        from distributed.train.coordinator import remote_class
        from distributed.train.worker import Worker

        config = self.config
        self.waiting_for = ("restarting the actors" if restarting else
                            "starting the actors and building the graphs")
        cfg = config.to_dict()
        env = {} if self.actor_env is None else {"runtime_env": self.actor_env}
        coordinator = remote_class(self.coordinator_cls).options(
            num_cpus=COORDINATOR_CPUS, **env,
            **self.hooks.actor_options(None)).remote(cfg, restarting)
        workers = [ray.remote(Worker).options(
            num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker,
            **env, **self.hooks.actor_options(rank)).remote(cfg, rank)
            for rank in range(config.workers)]
        self._coordinator, self._workers = coordinator, workers
        self._servers = self._start_servers(env)
        self._poll_ref = None  # a poll of a previous attempt's coordinator is dead
        self._worker_names = [f"worker {r}" for r in range(len(workers))]
        return coordinator, workers

    def _start_servers(self, env: dict) -> list:
        """``config.parameter_servers`` new parameter servers (see train/ps.py)."""
        import ray

        from distributed.train.ps import ParameterServer, actor_options
        cfg = self.config.to_dict()
        return [ray.remote(ParameterServer).options(
            **actor_options(self.config), **env,
            **self.hooks.server_options(task)).remote(cfg, task)
            for task in range(self.config.parameter_servers)]

    def _start_server_group(self, addresses: list[str]) -> list[str] | None:
        """Starts the parameter servers' TF servers in the workers' cluster;
        returns their addresses (``None`` without servers)."""
        if not self._servers:
            return None
        names = [f"parameter server {t}" for t in range(len(self._servers))]
        servers = self._get([s.address.remote() for s in self._servers], names)
        self._get([s.start.remote(addresses, servers) for s in self._servers], names)
        return servers

    def _handshake(self) -> BuildPlan:
        """Every worker joins the collective group and builds its graph, the
        coordinator builds the chief graph; nothing is written yet."""
        coordinator, workers = self._coordinator, self._workers
        # The coordinator learns the input spec from the input function while
        # the workers set up; a Ray Data input's spec comes from worker 0.
        plan_ref = (None if self.dataset is not None else
                    coordinator.build.remote(None, self.eval_dataset))
        addresses = self._get([w.address.remote() for w in workers], self._worker_names)
        if len(set(addresses)) != len(addresses):
            raise GroupFailure(f"two workers picked the same TF server address "
                               f"({addresses})")
        if self.dataset is not None:
            from distributed.inputs.raystream import start_feeder
            config = self.config
            self._feeder = start_feeder(self.dataset, len(workers), config.batch_size,
                                        config.input_label, config.input_ref)
        servers = self._start_server_group(addresses)
        setups = [w.setup.remote(addresses, self._feeder,
                                 *([servers] if servers else []))
                  for w in workers]
        if plan_ref is None:
            plan_ref = coordinator.build.remote(
                self._get(setups[0], "worker 0").input_spec, self.eval_dataset)
        built = self._get(plan_ref, "the coordinator")
        if servers:
            self._get(coordinator.connect_servers.remote(servers), "the coordinator")
        for rank, setup in enumerate(self._get(setups, self._worker_names)):
            if setup.input_spec != built.input_spec:
                raise ConfigError(
                    f"input: {self.config.input_ref} gives {setup.input_spec} on worker "
                    f"{rank} but {built.input_spec} on worker 0; every worker's input "
                    "must have the same feature names, dtypes and shapes")
        return built

    def _open(self, restarting: bool) -> OpenedRun:
        """The coordinator opens the run's storage; returns where training
        starts, after saying where that is."""
        echo = self.echo
        opened = self._get(self._coordinator.open_run.remote(), "the coordinator")
        if not restarting:
            for message in opened.warnings:
                echo(f"WARNING: {message}")
        if opened.removed:
            echo(f"removed {len(opened.removed)} leftover(s) of an interrupted save")
        if opened.recreated_serving is not None:
            self._say_recreated(opened.recreated_serving)
        if restarting:
            self._note_restart(opened)
        elif opened.resumed_from is not None:
            echo(f"resuming run {self.config.run!r} from its full checkpoint at step "
                 f"{opened.resumed_from} (optimizer state and step included)")
        self.step = opened.start_step
        return opened

    def _note_restart(self, opened: OpenedRun) -> None:
        """Says, and records for TensorBoard, what the failure cost."""
        step = opened.start_step
        source = (f"the full checkpoint at step {opened.resumed_from}"
                  if opened.resumed_from is not None else
                  "the initial values (no full checkpoint yet)")
        redone = max(0, self.step - step)
        self.echo(f"restarted: resuming from {source}; "
                  + (f"steps {step + 1}..{self.step} are redone ({redone} steps), "
                     "then the interrupted round's" if redone else
                     "only the interrupted round's steps are redone"))
        self.restarts += 1
        self._coordinator.record.remote(step, {"train/group_restarts": self.restarts,
                                               "train/steps_redone": redone})

    def _say_recreated(self, step: int) -> None:
        self.echo(f"re-created the serving checkpoint at step {step} from the full "
                  "checkpoint (its save was lost with the failure)")

    def _load(self, built: BuildPlan, opened: OpenedRun, restarting: bool) -> None:
        """Every worker loads the coordinator's values: all replicas start equal."""
        coordinator, config, step = self._coordinator, self.config, opened.start_step
        values = coordinator.initial_values.remote()
        positions = coordinator.input_positions.remote()
        if self._feeder is not None:  # deals from the plan of rank 0's position
            saved = self._get(positions, "the coordinator")
            note = self._get(self._feeder.start.remote(
                saved[0] if saved else None, config.saves_input_position),
                "the Ray Data input")
            if note:
                self.echo(note)
        # Parameter servers: rank 0 initializes or restores their variables
        # (and re-makes a serving checkpoint a failure lost).
        extra = {"server_checkpoint": coordinator.server_checkpoint.remote(),
                 "remake_serving": opened.remake_serving} if self._servers else {}
        remade = self._get([w.load.remote(values, step, built.serving_names, coordinator,
                                          positions, **(extra if rank == 0 else {}))
                            for rank, w in enumerate(self._workers)],
                           self._worker_names)[0]
        if self._servers:  # rank 0 has read the servers' tables
            self._get(coordinator.loaded.remote(), "the coordinator")
        self._report(remade)
        if any(e.kind == COMMITTED for e in remade):
            self._say_recreated(opened.remake_serving)
        if not restarting:
            self.first_step_at = time.perf_counter() - self.t0
            self.echo(f"run {config.run!r}: {config.workers} workers; checkpoints hold "
                      f"{built.full_tensors} tensors ({built.full_bytes / 2**20:.2f} MiB)"
                      f" when full, {built.serving_tensors} "
                      f"({built.serving_bytes / 2**20:.2f} MiB) for serving; storage "
                      f"{config.storage_path}; first step after {self.first_step_at:.1f}s")

    def _train_rounds(self, step: int) -> int:
        """Rounds of ``log_every`` steps to ``config.steps`` or an early stop;
        returns the step reached."""
        config = self.config
        self.stop_reason = None
        while step < config.steps and self.stop_reason is None:
            target = min(config.steps, (step // config.log_every + 1) * config.log_every)
            self.waiting_for = f"training steps {step + 1}..{target} of {config.steps}"
            reports = self._get([w.train.remote(target) for w in self._workers],
                                self._worker_names,
                                straggler_seconds=config.collective_timeout + 30.0)
            lead = reports[0]
            self.rounds.append(lead)
            step = self.step = lead.step
            self._report(lead.events)
            self._poll_evaluations()
            self.echo(f"step {step}/{config.steps}  mean loss {lead.loss:.4f}  "
                      f"{lead.steps_per_sec:.1f} steps/s")
            logs.set_step(step)
            self._record_round(lead)
            self.stop_reason = self.stop_reason or self.hooks.stop_reason()
        if self.stop_reason is not None:
            self.echo(f"early stop after step {step}: {self.stop_reason}")
        return step

    def _record_round(self, lead: RoundReport) -> None:
        """The round's scalars to the coordinator's TensorBoard events."""
        scalars = {"train/loss": lead.loss,
                   "train/steps_per_sec": lead.steps_per_sec,
                   "train/examples_per_sec": lead.steps_per_sec
                   * self.config.batch_size * self.config.workers}
        if lead.learning_rate is not None:
            scalars["train/learning_rate"] = lead.learning_rate
        if lead.stall_seconds is not None:
            scalars["checkpoint/rank0_stall_seconds_total"] = lead.stall_seconds
        self._coordinator.record.remote(lead.step, scalars)  # fire and forget

    def _shut_down(self) -> list[dict]:
        """Waits for the last saves (and evaluations); returns the catalog's entries."""
        coordinator = self._coordinator
        self.waiting_for = "waiting for the last checkpoint saves"
        self._report(self._get(self._workers[0].finish.remote(), "worker 0"))
        if self.config.eval is not None:
            self.waiting_for = "waiting for the last evaluations"
            self._get(coordinator.close.remote(), "the coordinator")
            self._poll_evaluations(wait=True)
        else:
            coordinator.close.remote()  # ordered before entries(): calls run in turn
        return self._get(coordinator.entries.remote(), "the coordinator")

    def _poll_evaluations(self, wait: bool = False) -> None:
        """Reports the coordinator's evaluation events without ever making the
        workers wait: a poll still running is collected at the next round."""
        import ray
        if self.config.eval is None:
            return
        ref = self._poll_ref
        if ref is not None and (wait or ray.wait([ref], timeout=0)[0]):
            self._report(self._get(ref, "the coordinator"))
            ref = None
        if wait:
            self._report(self._get(self._coordinator.poll.remote(), "the coordinator"))
        elif ref is None:
            ref = self._coordinator.poll.remote()
        self._poll_ref = None if wait else ref

    def _report(self, events: Sequence[CheckpointEvent]) -> None:
        """Records rank 0's checkpoint events and prints a line for each."""
        for event in events:
            if event.kind == EARLY_STOP:
                self.stop_reason = self.stop_reason or event.reason
                continue
            self.events.append(event)
            self.echo(event.describe())
            self.stop_reason = self.stop_reason or self.hooks.on_event(event)

    def _get(self, refs, names, straggler_seconds: float | None = None):
        """``ray.get`` that fails as soon as any ref fails (:meth:`_raise_failure`).

        With ``straggler_seconds``, once one ref is done the others must follow
        within that many seconds (workers end a round together): a worker
        stopped outside a collective, which no collective timeout can catch,
        becomes a :class:`GroupFailure`.
        """
        import ray
        single = not isinstance(refs, list)
        refs_list = [refs] if single else list(refs)
        names_list = [names] if single else list(names)
        pending = list(refs_list)
        start = time.monotonic()
        first_done = None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            if not ready:
                now = time.monotonic()
                self.status.update(f"{self.waiting_for} ({now - start:.0f}s)")
                if first_done is not None and straggler_seconds is not None and \
                        now - first_done > straggler_seconds:
                    late = [names_list[refs_list.index(r)] for r in pending]
                    raise GroupFailure(
                        f"{', '.join(late)} stopped responding: not done "
                        f"{straggler_seconds:.0f}s after the others finished the round")
                continue
            if first_done is None:
                first_done = time.monotonic()
            try:
                ray.get(ready[0])
            except Exception as e:
                self._raise_failure(e, names_list[refs_list.index(ready[0])], pending)
        values = ray.get(refs_list)
        return values[0] if single else values

    def _raise_failure(self, error: Exception, name: str, pending: list) -> NoReturn:
        """Raises what a failed call of ``name`` means for the run.

        A user error raised in an actor is re-raised as itself (after the other
        refs had a moment to finish, so rank 0 can commit an in-flight save); a
        dead actor or a failed collective becomes :class:`GroupFailure`.
        """
        # A user error on one worker fails its peers' collectives too; the
        # user's own message is the one to tell.
        users = None if isinstance(unwrap(error), DistributedError) else \
            user_error_among(pending)
        if users is not None:
            error = users
        failure = None if users is not None else classify(error, name)
        if failure is not None:
            raise (self._dead_server() or failure) from None
        if pending:
            self._settle()
        raise unwrap(error) from None

    def _dead_server(self) -> GroupFailure | None:
        """A dead parameter server, named, when there is one: the workers only
        see their reads and writes to it fail."""
        import ray
        if not self._servers:
            return None
        refs = [s.ping.remote() for s in self._servers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5)
        for task, ref in enumerate(refs):
            if ref in ready:
                failure = _failure_of(ref, f"parameter server {task}")
                if failure is not None:
                    return failure
        return None

    def _settle(self) -> None:
        """After a user error, before the actors are stopped: lets the saves
        in flight commit. The coordinator runs calls in turn, so a call queued
        behind them returns when they are done; the other workers may be
        waiting in a collective for the failed one and never finish."""
        import ray
        # Rank 0's hand-off of a due checkpoint may not have reached the
        # coordinator yet (a full one waits for every worker's input
        # position): let it finish, unless rank 0 is stuck in a collective.
        ray.wait([self._workers[0].finish.remote()], timeout=10)
        ray.wait([self._coordinator.entries.remote()], timeout=30)


def _failure_of(ref, name: str) -> GroupFailure | None:
    """The :class:`GroupFailure` a finished call's ref holds, if any."""
    import ray
    try:
        ray.get(ref)
    except Exception as e:  # noqa: BLE001 - classified
        return classify(e, name)
    return None
