"""The driver's view of Ray: join or start it, check it can hold the run, and
hand the actors the driver's environment.

Local single-node dev mode: with no ``RAY_ADDRESS`` (and not under
``ray job submit``) a local Ray is started and shut down at the end. Otherwise
the run joins the cluster it is pointed at.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from distributed import logs, tfworld
from distributed.config import TrainConfig
from distributed.errors import ConfigError

COORDINATOR_CPUS = 0.25
_ACTOR_ENV = {**tfworld.ENV, "PYTHONUNBUFFERED": "1"}
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
        _init_keeping_sigterm_handler(log_to_driver=True, logging_level=logging.WARNING)
        return False
    # A local Ray's worker processes inherit this environment, so the actors
    # need no runtime_env of their own and can use the workers Ray prestarts.
    cwd = os.getcwd()
    os.environ.update(actor_env_vars())
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (cwd, os.environ.get("PYTHONPATH")) if p)
    # address="local": a new Ray even when /tmp/ray names a running one (another
    # user's `ray start`); joining a cluster is what RAY_ADDRESS is for.
    _init_keeping_sigterm_handler(
        address="local", include_dashboard=False, log_to_driver=True,
        logging_level=logging.WARNING)  # not "Started a local Ray instance"
    return True


def _init_keeping_sigterm_handler(**init_args) -> None:
    """``ray.init``, which installs a SIGTERM handler that exits the process,
    without losing the handler an entry point installed before it (the
    process guard, :mod:`distributed.cli.guard`, stops the actors on SIGTERM
    as on Ctrl-C, so the run can be resumed)."""
    import ray
    handler = signal.getsignal(signal.SIGTERM)
    ray.init(**init_args)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def ray_shutdown() -> None:
    import ray
    ray.shutdown()


def check_resources(config: TrainConfig) -> None:
    """Fails before any actor starts when the cluster cannot hold the run."""
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
    _check_server_resources(config, total)


def _check_server_resources(config: TrainConfig, total: dict) -> None:
    """The parameter servers fit too (a server Ray cannot place would leave the
    run waiting for it forever)."""
    if config.parameter_servers == 0:
        return
    need_cpus = (config.workers * config.cpus_per_worker + COORDINATOR_CPUS
                 + config.parameter_servers * config.ps_cpus)
    if need_cpus > total.get("CPU", 0):
        raise ConfigError(
            f"ps_cpus: {config.parameter_servers} parameter servers x "
            f"{config.ps_cpus:g} CPU, with the workers and the coordinator, need "
            f"{need_cpus:g} CPUs but the cluster has {total.get('CPU', 0):g}; lower "
            "ps_cpus, parameter_servers or cpus_per_worker")
    if config.ps_memory and config.ps_memory > total.get("memory", 0):
        raise ConfigError(
            f"ps_memory: {config.ps_memory / 2**30:.2f} GiB per parameter server, but "
            f"the cluster's nodes offer Ray {total.get('memory', 0) / 2**30:.2f} GiB "
            "in all; lower ps_memory")
    for key, amount in config.ps_resources.items():
        need = config.parameter_servers * amount
        if need > total.get(key, 0):
            raise ConfigError(
                f"ps_resources.{key}: {config.parameter_servers} parameter servers x "
                f"{amount:g} need {need:g} but the cluster has {total.get(key, 0):g} "
                f"of {key!r}; start nodes with --resources='{{\"{key}\": N}}' or "
                "lower it")


def check_gpus(config: TrainConfig, started: bool) -> None:
    """GPU workers only: every worker's node has a TensorFlow that sees a GPU
    (a probe placed like a worker, :mod:`distributed.train.devices`), before
    the actors start and anything is written."""
    from distributed.train import devices
    devices.check_workers_see_gpus(
        config, None if started else {"env_vars": actor_env_vars()})


def free_cpus(config: TrainConfig) -> float:
    """CPUs of the cluster the run's actors leave for other tasks."""
    import ray
    return ray.cluster_resources().get("CPU", 0) - (
        config.workers * config.cpus_per_worker + COORDINATOR_CPUS
        + config.parameter_servers * config.ps_cpus)
