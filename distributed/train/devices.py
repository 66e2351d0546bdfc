"""Which processes see a GPU: workers that hold one, and nobody else.

Ray 2.60 no longer hides GPUs from actors that ask for none (it sets
``CUDA_VISIBLE_DEVICES`` only for actors with ``num_gpus > 0``; ray-project/ray
issue 54868), so on a GPU node the coordinator, its evaluator and CPU workers
would see every GPU: their Sessions place ops on GPU:0 and TF reserves nearly
all of its memory before the workers start. :func:`hide_gpus` is what those
processes call first; :func:`cpu_only` is the Session config that keeps them
on the CPU even where a GPU is visible.

A worker with ``gpus_per_worker > 0`` whose TensorFlow sees no GPU (plain
``tensorflow`` without its CUDA libraries, a driver missing) would pin its
step to a device that does not exist; :func:`check_workers_see_gpus` finds
that before a run writes anything, with a probe placed like a worker, and
:func:`check_this_worker` again in each worker.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from distributed.errors import ConfigError

# How long the driver waits for its probes to be placed and report; a cluster
# that scales GPU nodes up takes longer, and then each worker checks itself.
PROBE_SECONDS = 90.0
INSTALL_HINT = ("install TensorFlow's CUDA build there (pip install "
                "'distributed-tf-ray[gpu]', i.e. tensorflow[and-cuda], and check "
                "nvidia-smi) or set gpus_per_worker: 0 to train on CPUs")


def hide_gpus() -> None:
    """Makes this Ray actor's TensorFlow see no GPU (an actor that holds none).

    Call it before TensorFlow creates its devices (before the first Session
    or device query; importing TensorFlow is fine). Where TensorFlow is
    already imported its eager context is told too. Outside a Ray actor (a
    test or driver that builds the class in its own process) nothing changes:
    that process's GPUs are not ours to hide; :func:`cpu_only` still keeps
    the Sessions off them.
    """
    from distributed import logs
    if not logs.in_ray_actor():
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        try:
            tf.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError):  # devices already made: cpu_only() still holds
            pass


def cpu_only(base: Any = None):
    """A Session ConfigProto (a copy of ``base``) that places nothing on a GPU."""
    import tensorflow as tf
    config = tf.compat.v1.ConfigProto()
    if base is not None:
        config.CopyFrom(base)
    config.device_count["GPU"] = 0
    return config


def thread_config(intra: int, inter: int, cpus: float):
    """A Session and server ConfigProto with these thread pools for an actor
    that asked Ray for ``cpus``.

    Below one CPU the actor shares its core with others (dev mode's
    ``cpus_per_worker: 0.5`` puts two workers, a coordinator and any servers
    on two cores), so its idle TF threads sleep at once instead of spinning
    first: spinning burns the time the process it waits for needs. Measured
    on 2 cores with 2 workers: 9% more steps/s replicated, 7% with 2
    parameter servers. A whole core or more keeps TF's default (spinning
    saves a wake-up per op where the core would sit idle anyway).
    """
    import tensorflow as tf
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra,
                                      inter_op_parallelism_threads=inter)
    config.experimental.disable_thread_spinning = cpus < 1
    return config


def gpu_report() -> dict[str, Any]:
    """What this process's TensorFlow sees, and where it runs."""
    import tensorflow as tf
    try:
        import ray
        node = ray.util.get_node_ip_address()
    except Exception:  # not in Ray: the host name alone
        node = "?"
    return {"node": node, "host": socket.gethostname(),
            "gpus": len(tf.config.list_physical_devices("GPU")),
            "cuda_build": bool(tf.test.is_built_with_cuda()),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def no_gpu_message(report: dict[str, Any], gpus_per_worker: float) -> str:
    """One line: which node's TensorFlow sees no GPU, and the fix."""
    why = (f"Ray gave it CUDA_VISIBLE_DEVICES={report['visible']}"
           if report["visible"] else "no CUDA_VISIBLE_DEVICES")
    if not report["cuda_build"]:
        why += "; this TensorFlow is not a CUDA build"
    return (f"gpus_per_worker: {gpus_per_worker:g}, but TensorFlow on node "
            f"{report['node']} ({report['host']}) sees no GPU ({why}); {INSTALL_HINT}")


def check_this_worker(gpus_per_worker: float) -> None:
    """Raises :class:`ConfigError` if this GPU worker's TensorFlow sees no GPU.

    NOTE: only a worker with ``gpus_per_worker > 0`` calls this, before it
    builds its graph.
    """
    report = gpu_report()
    if report["gpus"] == 0:
        raise ConfigError(no_gpu_message(report, gpus_per_worker))


class _GpuProbe:
    """A throwaway actor placed like a worker; reports what TF sees there."""

    def report(self) -> dict[str, Any]:
        from distributed import logs
        logs.quiet_native_stderr(replace_any=True)  # TF's CUDA probe lines
        return gpu_report()


def check_workers_see_gpus(config, runtime_env: dict | None = None,
                           timeout: float = PROBE_SECONDS) -> None:
    """Before a GPU run starts: every worker's node has a TensorFlow that sees
    a GPU, or :class:`ConfigError` names the node and the fix.

    One probe actor per worker, with the worker's resources, all at once (so
    they spread over nodes as the workers will); each imports TensorFlow and
    lists its GPUs. Probes not placed within ``timeout`` (GPU nodes still
    scaling up) are given up on; those workers check themselves in setup.
    No-op for CPU workers.
    """
    if config.gpus_per_worker <= 0:
        return
    import ray
    options = {"num_cpus": config.cpus_per_worker, "num_gpus": config.gpus_per_worker}
    if runtime_env:
        options["runtime_env"] = runtime_env
    probes = [ray.remote(_GpuProbe).options(**options).remote()
              for _ in range(config.workers)]
    try:
        refs = [p.report.remote() for p in probes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            try:
                report = ray.get(ref)
            except Exception:  # a probe that failed: the workers report why
                continue
            if report["gpus"] == 0:
                raise ConfigError(no_gpu_message(report, config.gpus_per_worker))
    finally:
        for probe in probes:
            ray.kill(probe, no_restart=True)
