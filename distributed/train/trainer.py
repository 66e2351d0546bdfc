"""The driver side of a run: start or join Ray, start the actors, step, report.

Local single-node dev mode: with no ``RAY_ADDRESS`` (and not under
``ray job submit``) a local Ray is started and shut down at the end. Otherwise
the run joins the cluster it is pointed at.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

from distributed import logs, tfworld
from distributed.config import TrainConfig
from distributed.errors import (ConfigError, DistributedError, StepError, StorageError,
                                TrainingFailedError, last_line)
from distributed.model import load_function
from distributed.progress import StatusLine
from distributed.train.op_errors import INFRASTRUCTURE_ERRORS
from distributed.train.protocol import (EARLY_STOP, CheckpointEvent, CoordinatorLostError,
                                        RoundReport)

log = logging.getLogger(__name__)

_ACTOR_ENV = {**tfworld.ENV, "PYTHONUNBUFFERED": "1"}
COORDINATOR_CPUS = 0.25
# The driver's own settings of these reach the actors (on a cluster too).
_PASSED_ENV = (logs.VERBOSE_ENV, "DTR_LOG_FORMAT")


def actor_env_vars() -> dict[str, str]:
    """Environment variables every actor gets: :data:`_ACTOR_ENV` (the one TF
    world, :mod:`distributed.tfworld`, as the driver has it), with the
    driver's own values of :data:`_PASSED_ENV` where it has them."""
    env = {**_ACTOR_ENV, **tfworld.actor_env()}
    env.update({k: os.environ[k] for k in _PASSED_ENV if k in os.environ})
    return env


def connect_ray() -> bool:
    """Joins the cluster named by ``RAY_ADDRESS`` or starts a local one.

    Returns:
        True if this call started a local Ray (the caller shuts it down).
    """
    import ray
    if ray.is_initialized():
        return False
    if not sys.stderr.isatty():  # no colour codes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, logging_level=logging.WARNING)
        _handle_sigterm()
        return False
    # A local Ray's worker processes inherit this environment, so the actors
    # need no runtime_env of their own and can use the workers Ray prestarts.
    cwd = os.getcwd()
    os.environ.update(actor_env_vars())
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (cwd, os.environ.get("PYTHONPATH")) if p)
    # address="local": a new Ray even when /tmp/ray names a running one (another
    # user's `ray start`); joining a cluster is what RAY_ADDRESS is for.
    ray.init(address="local", include_dashboard=False, log_to_driver=True,
             logging_level=logging.WARNING)  # not "Started a local Ray instance"
    _handle_sigterm()
    return True


def _check_resources(config: TrainConfig) -> None:
    import ray
    total = ray.cluster_resources()
    need_gpus = config.workers * config.gpus_per_worker
    need_cpus = config.workers * config.cpus_per_worker + COORDINATOR_CPUS
    if need_gpus > total.get("GPU", 0):
        raise ConfigError(
            f"gpus_per_worker: {config.workers} workers x {config.gpus_per_worker} "
            f"GPU need {need_gpus:g} GPUs but the cluster has "
            f"{total.get('GPU', 0):g}; lower --workers or gpus_per_worker "
            "(0 runs on CPU)")
    if need_cpus > total.get("CPU", 0):
        raise ConfigError(
            f"cpus_per_worker: {config.workers} workers x {config.cpus_per_worker} "
            f"CPU + {COORDINATOR_CPUS} for the coordinator need {need_cpus:g} CPUs "
            f"but the cluster has {total.get('CPU', 0):g}; lower --workers or "
            "cpus_per_worker")


def _check_gpus(config: TrainConfig, started: bool) -> None:
    """GPU workers only: every worker's node has a TensorFlow that sees a GPU
    (a probe placed like a worker, :mod:`distributed.train.devices`), before
    the actors start and anything is written."""
    from distributed.train import devices
    devices.check_workers_see_gpus(
        config, None if started else {"env_vars": actor_env_vars()})


def _free_cpus(config: TrainConfig) -> float:
    """CPUs of the cluster the run's actors leave for other tasks."""
    import ray
    return ray.cluster_resources().get("CPU", 0) - (
        config.workers * config.cpus_per_worker + COORDINATOR_CPUS)


def check_storage(config: TrainConfig) -> None:
    """Fails fast, before Ray starts, when the storage directory is not writable.

    Creates the storage directory (not the run's) and writes and removes a
    probe file in it.
    """
    if config.remote:  # reachable, bucket there, credentials accepted
        from distributed.storage.remote import open_remote
        open_remote(config.storage, config.storage_options)
    path = config.storage_path  # for an object store: the local staging mirror
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StorageError(
            f"storage: cannot write to {path!r} ({e.strerror or e}); point "
            "--storage or the config's storage at a writable directory that every "
            "node mounts at the same path") from None


def check_functions(config: TrainConfig) -> None:
    """Imports the model and input functions in the driver, before any actor,
    and builds the optimizer and its schedule in a throwaway graph."""
    load_function(config.model, "model", 4)
    from distributed.train import optimizers
    optimizers.check(config.optimizer, config.model_params)
    for field, named, _ in _inputs(config):
        if named.ray_input:
            load_function(named.input_ref, f"{field}.ray_dataset", 1)
        else:
            load_function(named.input_ref, field, 4)


def _inputs(config: TrainConfig) -> list[tuple[str, Any, dict]]:
    """``(field, config part, params)`` of the input and the eval input."""
    inputs = [("input", config, config.input_params)]
    if config.eval is not None:
        inputs.append(("eval.input", config.eval,
                       config.eval.params_or(config.input_params)))
    return inputs


def _load_ray_datasets(config: TrainConfig) -> tuple[Any, Any]:
    """The Ray Data datasets of the input and the eval input (``None`` where
    that input is not Ray Data), loaded and checked in the driver before the
    actors take their CPUs."""
    loaded = {}
    for field, named, params in _inputs(config):
        if named.ray_input:
            from distributed.inputs import raydata
            dataset = raydata.load_dataset(named.input_ref, named.input_label, params,
                                           field=field)
            raydata.check_cpus(dataset, _free_cpus(config), named.input_ref)
            loaded[field] = dataset
    return loaded.get("input"), loaded.get("eval.input")


def train(config: TrainConfig, echo: Callable[[str], None] = print,
          coordinator_cls: type | None = None) -> dict[str, Any]:
    """Runs one training job to ``config.steps``; returns a summary dict.

    When the worker group fails (a worker or the coordinator dies, a
    collective times out), every actor is stopped and a new group resumes from
    the latest full checkpoint, up to ``config.max_failures`` times.

    Args:
        config: The run.
        echo: Where progress lines go.
        coordinator_cls: The coordinator class (tests pass a subclass that
            fails on purpose).
    """
    from distributed.train.coordinator import Coordinator

    t0 = time.perf_counter()
    # Every actor error is handled here; refs abandoned when a group is torn
    # down must not print "Unhandled error" tracebacks later.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # Ray Data's per-epoch execution banners are not the run's news (set
    # before Ray starts, so a local Ray's split coordinators inherit it).
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    complete = _complete_at(config)
    if complete is not None:
        entries = _committed_entries(config)
        echo(f"run {config.run!r} is complete: its full checkpoint is at step "
             f"{complete} and steps is {config.steps}. To train further, re-run "
             f"with a larger --steps (it resumes from step {complete}); for a new "
             "run, pick another --run.")
        echo(format_summary(config, entries))
        return {"run": config.run, "steps": complete, "entries": entries,
                "complete": True, "early_stop": None, "events": [], "rounds": [],
                "failures": [], "first_step_seconds": None,
                "seconds": time.perf_counter() - t0}
    check_functions(config)
    check_storage(config)
    started = connect_ray()
    try:
        _check_resources(config)
        _check_gpus(config, started)
        dataset, eval_dataset = _load_ray_datasets(config)
        failures: list[str] = []
        run = _GroupRun(config, echo, coordinator_cls or Coordinator, t0,
                        actor_env=None if started else {"env_vars": actor_env_vars()},
                        dataset=dataset, eval_dataset=eval_dataset)
        while True:
            try:
                summary = run.attempt(restarting=bool(failures))
            except StepError as e:  # the user's op failed: not retried
                raise StepError(f"{e}\n{_resume_note(config)}", e.op, e.kind,
                                e.tf_message) from None
            except GroupFailure as failure:
                failures.append(str(failure))
                if len(failures) > config.max_failures:
                    raise TrainingFailedError(
                        f"the worker group failed {len(failures)} times, more than "
                        f"max_failures={config.max_failures}; last failure: {failure}. "
                        f"The committed checkpoints under "
                        f"{os.path.join(config.storage_path, config.run)} are intact: "
                        "fix the cause and re-run with the same --run to resume "
                        "from the last full checkpoint") from None
                run.echo(f"FAILURE after step {run.step}: {failure}; restarting the "
                     f"worker group ({len(failures)} of max_failures="
                     f"{config.max_failures})")
                continue
            summary["failures"] = failures
            return summary
    finally:
        if started:
            ray_shutdown()


def _complete_at(config: TrainConfig) -> int | None:
    """The step of the run's newest full checkpoint if it is at or past
    ``config.steps`` (nothing is left to train), else ``None``. Local
    storage only: an object-store run's coordinator decides from the remote
    catalog."""
    if config.remote:
        return None
    try:
        newest = _newest_full_step(config)
    except OSError:  # StorageError too: the driver's check_storage says it later
        return None
    return newest if newest is not None and newest >= config.steps else None


def _newest_full_step(config: TrainConfig) -> int | None:
    """The step of the run's newest committed full checkpoint (the catalog's
    row names; no table is read)."""
    from distributed.checkpoint.store import CheckpointStore
    keys = CheckpointStore(config.storage_path, config.run).catalog.committed_keys()
    return max((step for step, tier in keys if tier == "full"), default=None)


def _resume_note(config: TrainConfig) -> str:
    """Where a stopped run stands: its newest full checkpoint, and how to go on."""
    newest = _newest_full_step(config)
    where = (f"the newest full checkpoint is at step {newest}" if newest is not None
             else "no full checkpoint yet: a re-run starts from the beginning")
    return (f"The checkpoints committed before it are intact ({where}, under "
            f"{os.path.join(config.storage_path, config.run)}); fix the cause and "
            "re-run with the same --run to resume.")


def _committed_entries(config: TrainConfig) -> list[dict]:
    from distributed.checkpoint.store import CheckpointStore
    store = CheckpointStore(config.storage_path, config.run)
    return [e.to_json_dict() for e in store.catalog.entries()]


def raydata_split(dataset, num_workers: int) -> list:
    from distributed.inputs import raydata
    return raydata.split(dataset, num_workers)


def ray_shutdown() -> None:
    import ray
    ray.shutdown()


class GroupFailure(Exception):
    """The worker group cannot go on (an actor died, a collective failed)."""


class _GroupRun:
    """Starts one group of actors (coordinator + workers) per attempt."""

    def __init__(self, config: TrainConfig, echo, coordinator_cls, t0: float,
                 actor_env: dict | None, dataset=None, eval_dataset=None):
        self.config = config
        self.dataset = dataset  # Ray Data input: split anew for every group
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

    def attempt(self, restarting: bool) -> dict[str, Any]:
        import ray

        from distributed.train.worker import Worker

        config = self.config
        self.waiting_for = ("restarting the actors" if restarting else
                            "starting the actors and building the graphs")
        cfg = config.to_dict()
        env = {} if self.actor_env is None else {"runtime_env": self.actor_env}
        coordinator = ray.remote(self.coordinator_cls).options(
            num_cpus=COORDINATOR_CPUS, **env).remote(cfg, restarting)
        workers = [ray.remote(Worker).options(
            num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker,
            **env).remote(cfg, rank) for rank in range(config.workers)]
        try:
            return self._run(coordinator, workers, restarting)
        finally:
            for actor in [coordinator] + workers:
                ray.kill(actor, no_restart=True)

    def _run(self, coordinator, workers, restarting: bool) -> dict[str, Any]:
        config, echo = self.config, self.echo
        self._coordinator = coordinator
        worker_names = [f"worker {r}" for r in range(len(workers))]
        # The coordinator learns the input spec from the input function while
        # the workers set up; a Ray Data input's spec comes from worker 0.
        plan_ref = (None if self.dataset is not None else
                    coordinator.build.remote(None, self.eval_dataset))
        addresses = self._get([w.address.remote() for w in workers], worker_names)
        if len(set(addresses)) != len(addresses):
            raise GroupFailure(f"two workers picked the same TF server address "
                               f"({addresses})")
        splits = ([None] * len(workers) if self.dataset is None else
                  raydata_split(self.dataset, len(workers)))
        setups = [w.setup.remote(addresses, s) for w, s in zip(workers, splits)]
        if plan_ref is None:
            plan_ref = coordinator.build.remote(
                self._get(setups[0], "worker 0").input_spec, self.eval_dataset)
        built = self._get(plan_ref, "the coordinator")
        for rank, setup in enumerate(self._get(setups, worker_names)):
            if setup.input_spec != built.input_spec:
                raise ConfigError(
                    f"input: {config.input_ref} gives {setup.input_spec} on worker "
                    f"{rank} but {built.input_spec} on worker 0; every worker's input "
                    "must have the same feature names, dtypes and shapes")
        opened = self._get(coordinator.open_run.remote(), "the coordinator")
        if not restarting:
            for message in opened.warnings:
                echo(f"WARNING: {message}")
        if opened.removed:
            echo(f"removed {len(opened.removed)} leftover(s) of an interrupted save")
        step = opened.start_step
        if opened.recreated_serving is not None:
            echo(f"re-created the serving checkpoint at step {opened.recreated_serving} "
                 "from the full checkpoint (its save was lost with the failure)")
        if restarting:
            source = (f"the full checkpoint at step {opened.resumed_from}"
                      if opened.resumed_from is not None else
                      "the initial values (no full checkpoint yet)")
            redone = max(0, self.step - step)
            echo(f"restarted: resuming from {source}; "
                 + (f"steps {step + 1}..{self.step} are redone ({redone} steps)"
                    if redone else "no step is redone"))
            self.restarts += 1
            coordinator.record.remote(step, {"train/group_restarts": self.restarts,
                                             "train/steps_redone": redone})
        elif opened.resumed_from is not None:
            echo(f"resuming run {config.run!r} from its full checkpoint at step "
                 f"{opened.resumed_from} (optimizer state and step included)")
        self.step = step
        values = coordinator.initial_values.remote()
        self._get([w.load.remote(values, step, built.serving_names, coordinator)
                   for w in workers], worker_names)
        if not restarting:
            echo(f"run {config.run!r}: {config.workers} workers; checkpoints hold "
                 f"{built.full_tensors} tensors ({built.full_bytes / 2**20:.2f} MiB)"
                 f" when full, {built.serving_tensors} "
                 f"({built.serving_bytes / 2**20:.2f} MiB) for serving; storage "
                 f"{config.storage_path}; first step after "
                 f"{time.perf_counter() - self.t0:.1f}s")
            self.first_step_at = time.perf_counter() - self.t0
        self.stop_reason = None
        while step < config.steps and self.stop_reason is None:
            target = min(config.steps, (step // config.log_every + 1) * config.log_every)
            self.waiting_for = f"training steps {step + 1}..{target} of {config.steps}"
            reports = self._get([w.train.remote(target) for w in workers], worker_names,
                                straggler_seconds=config.collective_timeout + 30.0)
            lead = reports[0]
            self.rounds.append(lead)
            step = self.step = lead.step
            self._report(lead.events)
            self._poll_evaluations(coordinator)
            echo(f"step {step}/{config.steps}  mean loss {lead.loss:.4f}  "
                 f"{lead.steps_per_sec:.1f} steps/s")
            logs.set_step(step)
            scalars = {"train/loss": lead.loss,
                       "train/steps_per_sec": lead.steps_per_sec,
                       "train/examples_per_sec": lead.steps_per_sec
                       * config.batch_size * config.workers}
            if lead.learning_rate is not None:
                scalars["train/learning_rate"] = lead.learning_rate
            if lead.stall_seconds is not None:
                scalars["checkpoint/rank0_stall_seconds_total"] = lead.stall_seconds
            coordinator.record.remote(step, scalars)  # fire and forget
        if self.stop_reason is not None:
            echo(f"early stop after step {step}: {self.stop_reason}")
        self.waiting_for = "waiting for the last checkpoint saves"
        self._report(self._get(workers[0].finish.remote(), "worker 0"))
        if config.eval is not None:
            self.waiting_for = "waiting for the last evaluations"
            self._get(coordinator.close.remote(), "the coordinator")
            self._poll_evaluations(coordinator, wait=True)
        else:
            coordinator.close.remote()  # ordered before entries(): calls run in turn
        entries = self._get(coordinator.entries.remote(), "the coordinator")
        echo(format_summary(config, entries))
        return {"run": config.run, "steps": step, "entries": entries,
                "early_stop": self.stop_reason,
                "events": self.events, "rounds": self.rounds,
                "first_step_seconds": self.first_step_at,
                "seconds": time.perf_counter() - self.t0}

    def _poll_evaluations(self, coordinator, wait: bool = False) -> None:
        """Reports the coordinator's evaluation events without ever making the
        workers wait: a poll still running is collected at the next round."""
        import ray
        if self.config.eval is None:
            return
        ref = getattr(self, "_poll_ref", None)
        if ref is not None and (wait or ray.wait([ref], timeout=0)[0]):
            self._report(self._get(ref, "the coordinator"))
            ref = None
        if wait:
            self._report(self._get(coordinator.poll.remote(), "the coordinator"))
        elif ref is None:
            ref = coordinator.poll.remote()
        self._poll_ref = None if wait else ref

    def _report(self, events: Sequence[CheckpointEvent]) -> None:
        """Records rank 0's checkpoint events and prints a line for each."""
        for event in events:
            if event.kind == EARLY_STOP:
                self.stop_reason = self.stop_reason or event.reason
                continue
            self.events.append(event)
            self.echo(event.describe())

    def _get(self, refs, names, straggler_seconds: float | None = None):
        """``ray.get`` that fails as soon as any ref fails.

        A user error raised in an actor is re-raised as itself (after the other
        refs had a moment to finish, so rank 0 can commit an in-flight save); a
        dead actor or a failed collective becomes :class:`GroupFailure`. With
        ``straggler_seconds``, once one ref is done the others must follow
        within that many seconds (workers end a round together): a worker
        stopped outside a collective, which no collective timeout can catch,
        becomes a :class:`GroupFailure` too.
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
                name = names_list[refs_list.index(ready[0])]
                # A user error on one worker fails its peers' collectives
                # too; the user's own message is the one to tell.
                users = None if isinstance(_unwrap(e), DistributedError) else \
                    _user_error_among(pending)
                if users is not None:
                    e = users
                failure = None if users is not None else _classify(e, name)
                if failure is not None:
                    raise failure from None
                if pending:
                    self._settle(pending)
                raise _unwrap(e) from None
        values = ray.get(refs_list)
        return values[0] if single else values


    def _settle(self, pending: list) -> None:
        """After a user error, before the actors are stopped: lets the saves
        in flight commit. The coordinator runs calls in turn, so a call queued
        behind them returns when they are done; the other workers may be
        waiting in a collective for the failed one and never finish."""
        import ray
        coordinator = getattr(self, "_coordinator", None)
        if coordinator is None:
            ray.wait(pending, num_returns=len(pending), timeout=30)
            return
        ray.wait([coordinator.entries.remote()], timeout=30)


def _user_error_among(refs: list, seconds: float = 5.0) -> BaseException | None:
    """The first of ``refs`` to fail with a user error within ``seconds``."""
    import ray
    pending, deadline = list(refs), time.monotonic() + seconds
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:
                if isinstance(_unwrap(e), DistributedError):
                    return e
    return None


def _unwrap(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, DistributedError) else e


def _classify(e: BaseException, name: str) -> GroupFailure | None:
    """A :class:`GroupFailure` for faults a restart can cure, else ``None``."""
    import ray
    if isinstance(e, ray.exceptions.RayActorError):
        return GroupFailure(f"{name} died ({last_line(e).split('. ')[0]})")
    if isinstance(e, (ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError,
                      ray.exceptions.NodeDiedError)):
        return GroupFailure(f"{name} was lost ({last_line(e)})")
    cause = getattr(e, "cause", None)
    kinds = {c.__name__ for c in type(cause).__mro__} if cause is not None else set()
    if kinds & INFRASTRUCTURE_ERRORS:
        return GroupFailure(f"{name}'s collective step failed ({type(cause).__name__}: "
                            f"{last_line(cause)}): a peer died or stalled")
    if isinstance(cause, CoordinatorLostError):
        return GroupFailure(f"{name} lost the coordinator ({last_line(cause)})")
    return None


def format_summary(config: TrainConfig, entries: list[dict]) -> str:
    names = ["loss"] + sorted({k for e in entries for k in e["metrics"]
                               if k.startswith("eval/")})
    widths = [max(8, len(n)) for n in names]
    lines = [f"committed checkpoints of run {config.run!r} "
             f"({os.path.join(config.storage_path, config.run)}; loss: the training "
             "loss at that step):",
             f"  {'tier':8} {'step':>8} {'tensors':>8} {'MiB':>9} {'shards':>6} "
             + " ".join(f"{n:>{w}}" for n, w in zip(names, widths)) + "  path"]
    for e in entries:
        values = [e["metrics"].get(n) for n in names]
        lines.append(f"  {e['tier']:8} {e['step']:>8} {e['num_tensors']:>8} "
                     f"{e['num_bytes'] / 2**20:>9.2f} {e['num_shards']:>6} "
                     + " ".join(f"{'' if v is None else f'{v:.4f}':>{w}}"
                                for v, w in zip(values, widths))
                     + f"  {e['path']}")
    if not entries:
        lines.append("  (none)")
    return "\n".join(lines)


def main_guard(fn: Callable[[], int]) -> int:
    """Runs an entry point: user errors print one line and exit 2, no traceback.

    SIGTERM (``ray job stop``, a scheduler) is handled like Ctrl-C: the actors
    are stopped and the run can be resumed.
    """
    global _sigterm_interrupts
    _sigterm_interrupts = True
    _handle_sigterm()
    try:
        return fn()
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; actors stopped. Re-run with the same --run to resume "
              "from the last full checkpoint.", file=sys.stderr)
        return 130


_sigterm_interrupts = False  # set by main_guard: entry points only


def _handle_sigterm() -> None:
    """Makes SIGTERM raise KeyboardInterrupt in an entry point's main thread.

    Called again after ``ray.init``, which installs a handler of its own.
    """
    if _sigterm_interrupts and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
