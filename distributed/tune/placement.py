"""What one trial holds: a placement group with a bundle per process of its run.

Bundle 0 is the trial itself (Tune's actor, the run's driver), bundle 1 the
coordinator, bundle 2 + r worker r, then one per parameter server (its
``ps_cpus``, ``ps_resources`` and ``ps_memory``). Tune reserves the whole group before the
trial starts, so concurrent trials never take each other's CPUs or GPUs, and
the trial places each actor in its own bundle (not in "any bundle with room",
where a coordinator could take the CPU a worker's bundle was sized for).
"""

from __future__ import annotations

from typing import Any

from distributed.config import TrainConfig
from distributed.train.cluster import COORDINATOR_CPUS

# The trial's own process: the driver of its run (it waits on the actors).
TRIAL_CPUS = 0.25


def bundles(config: TrainConfig) -> list[dict[str, float]]:
    """The placement group's bundles for a trial of ``config``."""
    worker = {"CPU": config.cpus_per_worker}
    if config.gpus_per_worker:
        worker["GPU"] = config.gpus_per_worker
    server: dict[str, float] = {"CPU": config.ps_cpus, **config.ps_resources}
    if config.ps_memory:
        server["memory"] = config.ps_memory
    return ([{"CPU": TRIAL_CPUS}, {"CPU": COORDINATOR_CPUS}]
            + [dict(worker) for _ in range(config.workers)]
            + [dict(server) for _ in range(config.parameter_servers)])


def resources(config: TrainConfig):
    """A :class:`ray.tune.PlacementGroupFactory` for a trial of ``config``.

    :func:`distributed.tune.trainable` asks for it already; pass it to
    ``tune.with_resources`` only to change the strategy (``PACK``: on as few
    nodes as fit).
    """
    from ray import tune
    return tune.PlacementGroupFactory(bundles(config), strategy="PACK")


def actor_options(config: TrainConfig, rank: int | None,
                  server: int | None = None) -> dict[str, Any]:
    """Ray options placing the coordinator (``rank=None``), worker ``rank`` or
    parameter server ``server`` in its bundle of the trial's placement group;
    none when the trial runs in a group of another shape
    (``tune.with_resources`` with other bundles), where Ray places them in any
    bundle with room."""
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    group = get_current_placement_group()
    if group is None or group.bundle_specs != bundles(config):
        return {}
    index = (1 if rank is None else 2 + rank) if server is None else \
        2 + config.workers + server
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=index)}
