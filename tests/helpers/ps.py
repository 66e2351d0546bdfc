"""Parameter-server runs several test modules share: a small wide-and-deep
config (partitioned tables, Adagrad) and the values its checkpoints hold,
read with stock TensorFlow."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from distributed import config as config_lib
from tests.helpers.training import ckpt_prefix, saved_variables

WIDE_DEEP = "distributed.examples.wide_deep:wide_deep_model_fn"
CLICKS = "distributed.examples.wide_deep:clicks_input_fn"
TABLE = "wide_deep/deep/id_embedding"


def wide_deep_config(storage: str, run: str, rows: int = 20_000, **overrides
                     ) -> config_lib.TrainConfig:
    """The wide-and-deep example with a ``rows`` x 8 id table in 4 parts on 2
    CPU workers; ``overrides`` replace top-level fields (``parameter_servers``
    for a run with servers)."""
    data = {"model": WIDE_DEEP, "input": CLICKS,
            "model_params": {"hash_buckets": rows, "embedding_dim": 8, "partitions": 4,
                             "cross_buckets": 5000, "hidden": [16]},
            "optimizer": {"name": "adagrad", "learning_rate": 0.1},
            "batch_size": 32, "steps": 40, "workers": 2, "cpus_per_worker": 0.5,
            "log_every": 20, "storage": storage, "run": run,
            "checkpoint": {"serving_every": 20, "full_every": 40},
            "retention": {"serving": {"keep_last": 10}, "full": {"keep_last": 10}},
            "collective_timeout": 60.0, "ps_cpus": 0.5}
    data.update(overrides)
    return config_lib.from_dict(data)


def checkpoint_values(storage: str, run: str, tier: str, step: int) -> dict:
    """Every tensor of a committed checkpoint by its logical name (a
    partitioned table whole), input positions left out."""
    reader = tf.train.load_checkpoint(ckpt_prefix(storage, run, tier, step))
    return {name: reader.get_tensor(name) for name in saved_variables(reader)}


def max_difference(a: dict, b: dict) -> tuple[float, str]:
    """The largest absolute difference between two checkpoints' values (same
    names required) and the tensor it is in."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    worst = max(a, key=lambda n: float(np.max(np.abs(a[n] - b[n]))) if a[n].size else 0.0)
    return float(np.max(np.abs(a[worst] - b[worst]))), worst


WARM_VALUE = 0.25


def warm_started_model_fn(features, labels, mode, params):
    """The wide-and-deep example whose scaffold's ``init_fn`` (a warm start)
    sets every part of the id table to ``WARM_VALUE``."""
    from distributed.examples.wide_deep import wide_deep_model_fn
    spec = wide_deep_model_fn(features, labels, mode, params)
    parts = [v for v in tf.compat.v1.global_variables()
             if v.op.name.startswith(f"{TABLE}/part_")]
    assign = tf.group(*(v.assign(tf.fill(tf.shape(v), WARM_VALUE)) for v in parts))
    scaffold = tf.compat.v1.train.Scaffold(init_fn=lambda _, sess: sess.run(assign))
    return dataclasses.replace(spec, scaffold=scaffold)
