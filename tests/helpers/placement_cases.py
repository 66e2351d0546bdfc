"""Every example's graphs, built as a GPU worker builds them (for
``tests/test_placement.py`` and ``scripts/gpu_smoke.py``).

A case is a config: each of ``jobs/configs/*.yaml`` whose input is not Ray
Data (a Ray Data input feeds placeholders, as ``digits_cnn`` does), plus the
examples no config names (embedding, images over tf.data, the Keras
application) and the ``piecewise`` learning-rate schedule. :func:`build` makes one mode's graph under ``/device:GPU:0``:
training as ``Worker.setup`` does (its input source with ``gpu=True``, so a
tf.data input is prefetched to the GPU; the all-reduce of a two-rank NCCL
group; ``steps_per_run`` > 1 as the in-graph loop), eval and predict as the
model function builds them on the input's placeholders.
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Any

import tensorflow as tf

from distributed import config as config_lib
from distributed.model.graphs import call_model_fn
from distributed.train import collective
from distributed.train.graph import build_train_graph

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU = "/device:GPU:0"
TWO_RANKS = ("127.0.0.1:1", "127.0.0.1:2")  # never contacted: the graph is only built


def cases(records_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """``name -> config dict``. ``records_dir``: where the images case's
    TFRecords go (written on first use); without it that case is left out."""
    out = {}
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "jobs", "configs", "*.yaml"))):
        cfg = config_lib.load(path, {})
        if cfg.ray_input:
            continue
        out[os.path.basename(path)[:-len(".yaml")]] = cfg.to_dict()
    # The piecewise schedule's Assert carries a string constant.
    out["digits_mlp_piecewise"] = {**out["digits_mlp"], "optimizer": {
        "name": "momentum", "momentum": 0.9, "learning_rate": {
            "schedule": "piecewise", "boundaries": [5, 15], "values": [0.1, 0.05, 0.01]}}}
    out["embedding"] = {"model": "distributed.examples.embedding:embedding_model_fn",
                        "input": "distributed.examples.embedding:embedding_input_fn"}
    out["keras_app"] = {"model": "distributed.examples.keras_app:app_model_fn",
                        "input": "distributed.examples.keras_app:app_input_fn",
                        "optimizer": {"name": "momentum", "learning_rate": 0.01}}
    if records_dir is not None:
        from distributed.examples import images
        path = os.path.join(records_dir, "images")
        if not os.path.isdir(path):
            images.write_tfrecords(path, *images.make_records(copies=1), files=2)
        out["images_tfdata"] = {
            "model": "distributed.examples.images:small_cnn_model_fn",
            "input": "distributed.examples.images:image_dataset_input_fn",
            "input_params": {"path": path}}
    return out


def loop_steps(case: dict[str, Any], steps: int = 2) -> int:
    """``steps`` for a case's in-graph loop, or 1 for a case with parameter
    servers (they refuse ``steps_per_run`` > 1: rank 0 updates them once per
    run)."""
    return 1 if case.get("parameter_servers") else steps


def gpu_spec(rank: int = 0) -> collective.GroupSpec:
    """A two-rank NCCL group, as a GPU worker's ``auto`` hint resolves."""
    return collective.GroupSpec(TWO_RANKS, rank, communication_hint="nccl")


def build(case: dict[str, Any], mode: str, steps_per_run: int = 1,
          spec: collective.GroupSpec | None = None) -> tf.Graph:
    """One mode's graph (``train``, ``eval``, ``predict``) as a GPU worker
    places it; the input source of a train graph is closed again."""
    from distributed import inputs
    cfg = config_lib.from_dict({**case, "steps_per_run": steps_per_run, "workers": 2})
    if mode == "train":
        reduce_fn = functools.partial(
            collective.allreduce_gradients, spec=spec or gpu_spec(),
            bucket_bytes=int(cfg.bucket_mib * 2**20),
            sparse_density_threshold=cfg.sparse_density_threshold,
            batch_size=cfg.batch_size)
        tg = build_train_graph(cfg, lambda: inputs.open_source(cfg, 0, gpu=True),
                               reduce_fn=reduce_fn, device=GPU,
                               steps_per_run=steps_per_run)
        tg.source.close()
        return tg.graph
    input_spec = inputs.probe_spec(cfg)
    graph = tf.Graph()
    with graph.as_default(), tf.device(GPU):
        features, labels = input_spec.placeholders()
        call_model_fn(cfg, features, labels if mode == "eval" else None, mode)
    return graph
