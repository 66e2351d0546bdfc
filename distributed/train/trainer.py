"""The driver side of a run: start or join Ray, start the actors, step, report.

Local single-node dev mode: with no ``RAY_ADDRESS`` (and not under
``ray job submit``) a local Ray is started and shut down at the end. Otherwise
the run joins the cluster it is pointed at.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

from distributed.config import TrainConfig
from distributed.errors import ConfigError, DistributedError

log = logging.getLogger(__name__)

_ACTOR_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1",
              "PYTHONUNBUFFERED": "1"}
COORDINATOR_CPUS = 0.25


def connect_ray() -> bool:
    """Joins the cluster named by ``RAY_ADDRESS`` or starts a local one.

    Returns:
        True if this call started a local Ray (the caller shuts it down).
    """
    import ray
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return False
    cwd = os.getcwd()
    path = os.pathsep.join(p for p in (cwd, os.environ.get("PYTHONPATH")) if p)
    ray.init(runtime_env={"env_vars": {**_ACTOR_ENV, "PYTHONPATH": path}},
             include_dashboard=False, log_to_driver=True)
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


def train(config: TrainConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs one training job to ``config.steps``; returns a summary dict."""
    import ray

    from distributed.train.coordinator import Coordinator
    from distributed.train.worker import Worker

    t0 = time.perf_counter()
    started = connect_ray()
    actors = []
    try:
        _check_resources(config)
        cfg = config.to_dict()
        env = {"env_vars": dict(_ACTOR_ENV)}
        coordinator = ray.remote(Coordinator).options(
            num_cpus=COORDINATOR_CPUS, runtime_env=env).remote(cfg)
        actors.append(coordinator)
        workers = [ray.remote(Worker).options(
            num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker,
            runtime_env=env).remote(cfg, rank) for rank in range(config.workers)]
        actors += workers
        plan_ref = coordinator.prepare.remote()
        addresses = ray.get([w.address.remote() for w in workers])
        setups = [w.setup.remote(addresses) for w in workers]  # overlaps prepare
        plan = _get(plan_ref)
        for message in plan["warnings"]:
            echo(f"WARNING: {message}")
        if plan["removed"]:
            echo(f"removed {len(plan['removed'])} leftover(s) of an interrupted save")
        step = plan["start_step"]
        if plan["resumed_from"] is not None:
            echo(f"resuming run {config.run!r} from its full checkpoint at step "
                 f"{plan['resumed_from']} (optimizer state and step included)")
        for rank, (_, spec) in enumerate(_get(setups)):
            if spec != plan["input_spec"]:
                raise ConfigError(
                    f"input: {config.input} yields {spec} on worker {rank} but "
                    f"{plan['input_spec']} on worker 0; every worker's batches must "
                    "have the same dtypes and shapes")
        values = coordinator.initial_values.remote()
        _get([w.load.remote(values, step, plan["serving_names"], coordinator)
              for w in workers])
        echo(f"run {config.run!r}: {config.workers} workers, "
             f"{plan['num_variables']} variables, serving checkpoints hold "
             f"{len(plan['serving_names'])} ({plan['serving_bytes'] / 2**20:.2f} MiB), "
             f"storage {config.storage_path}; first step after "
             f"{time.perf_counter() - t0:.1f}s")
        first_step_at = time.perf_counter() - t0
        events = []
        while step < config.steps:
            target = min(config.steps, (step // config.log_every + 1) * config.log_every)
            reports = _get([w.train.remote(target) for w in workers])
            lead = reports[0]
            step = lead["step"]
            for event in lead.get("events", []):
                events.append(event)
                echo(_describe(event))
            echo(f"step {step}/{config.steps}  loss {lead['loss']:.4f}  "
                 f"{lead['steps_per_sec']:.1f} steps/s")
        entries = _get(coordinator.entries.remote())
        summary = {"run": config.run, "steps": step, "entries": entries,
                   "events": events, "first_step_seconds": first_step_at,
                   "seconds": time.perf_counter() - t0}
        echo(format_summary(config, entries))
        return summary
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _get(refs):
    """``ray.get`` that turns a user error raised in an actor back into itself."""
    import ray
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if hasattr(e, "cause") else None
        if isinstance(cause, DistributedError):
            raise cause from None
        raise


def _describe(event: dict) -> str:
    if event["event"] == "committed":
        extra = (f", retention deleted steps {event['retention_deleted']}"
                 if event.get("retention_deleted") else "")
        return (f"  committed {event['tier']} checkpoint at step {event['step']} "
                f"({event['num_bytes'] / 2**20:.2f} MiB, {event['num_shards']} shard(s), "
                f"{event['save_seconds']:.2f}s{extra})")
    if event["event"] == "skipped":
        return (f"  skipped checkpoint at step {event['step']}: the previous save "
                "was still in flight (checkpoint.on_busy: skip)")
    return f"  checkpoint save FAILED: {event['error']} (training goes on)"


def format_summary(config: TrainConfig, entries: list[dict]) -> str:
    lines = [f"committed checkpoints of run {config.run!r} "
             f"({os.path.join(config.storage_path, config.run)}):",
             f"  {'tier':8} {'step':>8} {'tensors':>8} {'MiB':>9} {'shards':>6} "
             f"{'loss':>8}  path"]
    for e in entries:
        loss = e["metrics"].get("loss")
        lines.append(f"  {e['tier']:8} {e['step']:>8} {e['num_tensors']:>8} "
                     f"{e['num_bytes'] / 2**20:>9.2f} {e['num_shards']:>6} "
                     f"{'' if loss is None else f'{loss:.4f}':>8}  {e['path']}")
    if not entries:
        lines.append("  (none)")
    return "\n".join(lines)


def main_guard(fn: Callable[[], int]) -> int:
    """Runs an entry point: user errors print one line and exit 2, no traceback."""
    try:
        return fn()
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; actors stopped. Re-run with the same --run to resume "
              "from the last full checkpoint.", file=sys.stderr)
        return 130
