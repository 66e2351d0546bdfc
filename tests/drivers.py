"""Ways tests drive training without ``train()``: the coordinator's own graph
in-process (no Ray), and the actors on a real Ray, stepped by hand so the
test can read every replica's variables between rounds."""

from __future__ import annotations

import contextlib
from typing import Iterable

import ray

from distributed.examples.digits import digits_input_fn
from distributed.train import trainer
from distributed.train.coordinator import Coordinator
from distributed.train.worker import Worker


def train_in_process(cfg, steps: Iterable[int], full_at_end: bool = False):
    """Trains on the coordinator's own graph and saves a serving checkpoint at
    each of ``steps`` through its real save path, handing it what rank 0 would
    (values by variable name, the mean loss as the metric). No Ray.

    Returns the prepared :class:`Coordinator` (its Session open).
    """
    coord = Coordinator(cfg.to_dict())
    coord.prepare()
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


@contextlib.contextmanager
def actor_group(config):
    """A coordinator and ``config.workers`` workers on the running Ray, set up
    and loaded as ``train()`` does (rank 0 checkpoints); killed on exit.

    Yields ``(coordinator, workers, plan, setups, initial)``: the actors, the
    coordinator's plan, each worker's ``(pid, input_spec)`` and the initial
    values every replica loaded.
    """
    cfg = config.to_dict()
    env = {"env_vars": dict(trainer._ACTOR_ENV)}
    coordinator = ray.remote(Coordinator).options(
        num_cpus=trainer.COORDINATOR_CPUS, runtime_env=env).remote(cfg)
    workers = [ray.remote(Worker).options(num_cpus=config.cpus_per_worker,
                                          runtime_env=env).remote(cfg, rank)
               for rank in range(config.workers)]
    try:
        plan = ray.get(coordinator.prepare.remote())
        addresses = ray.get([w.address.remote() for w in workers])
        setups = ray.get([w.setup.remote(addresses) for w in workers])
        initial = ray.get(coordinator.initial_values.remote())
        ray.get([w.load.remote(initial, 0, plan["serving_names"], coordinator)
                 for w in workers])
        yield coordinator, workers, plan, setups, initial
    finally:
        for actor in workers + [coordinator]:
            ray.kill(actor)
