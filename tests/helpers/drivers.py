"""Ways tests drive training without ``train()``: the coordinator's own graph
in-process (no Ray), and the actors on a real Ray, stepped by hand so the
test can read every replica's variables between rounds."""

from __future__ import annotations

import contextlib
import types
from typing import Iterable

import ray

from distributed import config as config_lib
from distributed.examples.digits import digits_input_fn
from distributed.train import cluster, trainer
from distributed.train.coordinator import Coordinator, remote_class
from distributed.train.worker import Worker
from tests.helpers.training import MLP


def prepare(coordinator, input_spec=None) -> types.SimpleNamespace:
    """What the driver does first with a coordinator, in-process: build the
    chief graph, then open the run; returns both (``.build``, ``.opened``)."""
    build = coordinator.build(input_spec)
    return types.SimpleNamespace(build=build, opened=coordinator.open_run())


def train_in_process(cfg, steps: Iterable[int], full_at_end: bool = False):
    """Trains on the coordinator's own graph and saves a serving checkpoint at
    each of ``steps`` through its real save path, handing it what rank 0 would
    (values by variable name, the mean loss as the metric). No Ray.

    Returns the prepared :class:`Coordinator` (its Session open).
    """
    coord = Coordinator(cfg.to_dict())
    prepare(coord)
    tg = coord.tg
    batches = digits_input_fn(0, 1, 32, {})
    names = {v.op.name: v for v in tg.variables}
    done = 0
    for target in steps:
        while done < target:
            features, labels = next(batches)
            feed = {tg.features["image"]: features["image"], tg.labels: labels}
            _, loss = coord.sess.run([tg.train_op, tg.loss], feed)
            done += 1
        values = coord.sess.run({n: names[n] for n in coord.serving_names})
        coord.save(done, "serving", values, {"loss": float(loss)})
    if full_at_end:
        coord.save(done, "full", coord.sess.run(names), {})
    return coord


def train_digits_in_process(storage, run, model, policy="inference", steps=(20, 40),
                            include=()):
    """:func:`train_in_process` on one worker's digits config (the MLP with one
    hidden layer of 32), the checkpoints selected by ``policy`` and ``include``.

    Returns the prepared coordinator and the config.
    """
    cfg = config_lib.from_dict({
        "model": model, "storage": storage, "run": run, "workers": 1,
        "selection": {"policy": policy, "include": list(include)},
        "steps": max(steps), "model_params": {"hidden": [32]} if model == MLP else {}})
    return train_in_process(cfg, steps), cfg


@contextlib.contextmanager
def actor_group(config):
    """A coordinator and ``config.workers`` workers on the running Ray, set up
    and loaded as ``train()`` does (rank 0 checkpoints); killed on exit.

    Yields ``(coordinator, workers, plan, setups, initial)``: the actors, the
    coordinator's plan, each worker's ``(pid, input_spec)`` and the initial
    values every replica loaded.
    """
    cfg = config.to_dict()
    env = {"env_vars": cluster.actor_env_vars()}
    coordinator = remote_class(Coordinator).options(
        num_cpus=cluster.COORDINATOR_CPUS, runtime_env=env).remote(cfg)
    workers = [ray.remote(Worker).options(num_cpus=config.cpus_per_worker,
                                          runtime_env=env).remote(cfg, rank)
               for rank in range(config.workers)]
    try:
        build = ray.get(coordinator.build.remote())
        plan = types.SimpleNamespace(build=build, opened=ray.get(coordinator.open_run.remote()))
        addresses = ray.get([w.address.remote() for w in workers])
        setups = ray.get([w.setup.remote(addresses) for w in workers])
        initial = ray.get(coordinator.initial_values.remote())
        ray.get([w.load.remote(initial, 0, plan.build.serving_names, coordinator)
                 for w in workers])
        yield coordinator, workers, plan, setups, initial
    finally:
        for actor in workers + [coordinator]:
            ray.kill(actor)


def two_worker_config(module: str, model: str, input_fn: str, optimizer: dict,
                      storage: str, run: str, steps: int = 40,
                      eval_input_fn: str | None = None, **overrides
                      ) -> config_lib.TrainConfig:
    """The public-code tests' run: ``module``'s model on 2 workers of half a
    CPU, 16 examples a worker, serving checkpoints every ``steps // 2`` and a
    full one at the end, evaluated on ``eval_input_fn`` if given;
    ``overrides`` replace top-level fields."""
    data = {
        "model": f"{module}:{model}", "input": f"{module}:{input_fn}",
        "optimizer": optimizer, "storage": storage, "run": run, "workers": 2,
        "cpus_per_worker": 0.5, "batch_size": 16, "steps": steps,
        "log_every": steps // 2,
        "checkpoint": {"serving_every": steps // 2, "full_every": steps},
        "collective_timeout": 120.0}
    if eval_input_fn is not None:
        data["eval"] = {"input": f"{module}:{eval_input_fn}", "batch_size": 64}
    data.update(overrides)
    return config_lib.from_dict(data)


def export_last(storage: str, run: str, export: str) -> float:
    """Exports the run's last serving checkpoint with ``python -m
    jobs.restore`` in a fresh process (``TF_USE_LEGACY_KERAS`` unset);
    prints its output (shown with ``-s``), returns its seconds."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "jobs.restore", "--storage", storage,
                           "--run", run, "--export", export],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout + proc.stderr)
    return time.time() - started


def train_and_export(module: str, model: str, input_fn: str, eval_input_fn: str,
                     optimizer: dict, storage: str, run: str, export: str,
                     steps: int = 40):
    """What the public-code tests share: trains ``module``'s model on 2 workers
    of a real local Ray with evaluation (:func:`two_worker_config`), checks
    the run, then exports its last serving checkpoint (:func:`export_last`).
    Returns the serving catalog entries; prints the job's lines and timings
    (shown with ``-s``)."""
    import time

    from distributed.checkpoint import Catalog, RunLayout
    from tests.conftest import start_local_ray

    config = two_worker_config(module, model, input_fn, optimizer, storage, run, steps,
                               eval_input_fn=eval_input_fn)
    lines: list[str] = []
    started = time.time()
    with start_local_ray(4, log_to_driver=False):
        summary = trainer.train(config, echo=lines.append)
    trained = time.time() - started
    print("\n".join(lines))
    assert summary["steps"] == steps, lines
    assert not [line for line in lines if line.startswith("WARNING")], lines
    serving = [e for e in Catalog(RunLayout(storage, run)).entries()
               if e.tier == "serving"]
    assert [e.step for e in serving] == [steps // 2, steps], lines

    exported = export_last(storage, run, export)
    print(f"{run}: trained {steps} steps in {trained:.1f}s, exported in "
          f"{exported:.1f}s")
    return serving


def worker_stream(rows, first_seed: int, worker_index: int, num_workers: int,
                  batch_size: int):
    """Batches of ``rows(n, seed)`` blocks forever, a different stream per
    worker (seeds ``first_seed + block * num_workers + worker_index``)."""
    for block in range(10**9):
        yield from batches_of(*rows(
            batch_size * 16, seed=first_seed + block * num_workers + worker_index),
            batch_size)


def batches_of(x: dict, y, batch_size: int):
    """``(features, labels)`` batches of ``batch_size`` rows of one block of
    generated rows (the last may be smaller)."""
    for i in range(0, len(y), batch_size):
        yield {k: v[i:i + batch_size] for k, v in x.items()}, y[i:i + batch_size]


def wait_for_free_cpus(cpus: float, timeout: float = 30.0) -> float:
    """Waits until ``cpus`` CPUs of the local Ray are free again (the actors
    that held them are gone) or ``timeout`` passes; returns the free CPUs."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= cpus or time.monotonic() > deadline:
            return free
        time.sleep(0.2)
