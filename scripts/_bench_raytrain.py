#!/usr/bin/env python
"""The Ray Train baseline of ``bench_train.py``: ``TensorflowTrainer`` +
``MultiWorkerMirroredStrategy`` on the digits MLP (64 -> 256 -> 256 -> 10),
built with tf_keras, CPU workers. Run as its own process by the benchmark:

    python scripts/_bench_raytrain.py --steps 1500 --warmup 300 --json out.json

Inside the train loop a tf_keras callback takes the wall-clock time at the
first ``on_train_batch_begin`` and times batches ``warmup .. steps`` (steady
state); rank 0 reports both through ``ray.train.report`` and this script
writes the result (plus its own start time) as JSON.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before any TF import, here and in workers
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

PROCESS_START = time.time()


def train_loop_per_worker(cfg: dict) -> None:
    import os
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import time

    import numpy as np
    import ray.train
    import tensorflow as tf
    import tf_keras

    if cfg["intra"]:
        tf.config.threading.set_intra_op_parallelism_threads(cfg["intra"])
    if cfg["inter"]:
        tf.config.threading.set_inter_op_parallelism_threads(cfg["inter"])
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    workers = strategy.num_replicas_in_sync

    from sklearn.datasets import load_digits
    data = load_digits()
    x = (data.data[:1500] / 16.0).astype(np.float32)
    y = data.target[:1500].astype(np.int64)
    # The dataset's batch is the global batch; the strategy shards the data and
    # gives each worker batch_size (same per-worker batch as ours).
    ds = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(1500, seed=0).repeat()
          .batch(cfg["batch_size"] * workers, drop_remainder=True).prefetch(2))

    with strategy.scope():
        model = tf_keras.Sequential([
            tf_keras.layers.InputLayer(input_shape=(64,)),
            tf_keras.layers.Dense(256, activation="relu"),
            tf_keras.layers.Dense(256, activation="relu"),
            tf_keras.layers.Dense(10),
        ])
        model.compile(
            optimizer=tf_keras.optimizers.SGD(cfg["learning_rate"], momentum=cfg["momentum"]),
            loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    steps, warmup = cfg["steps"], cfg["warmup"]

    class Timer(tf_keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True  # no per-batch numpy conversion of logs
            self.first_batch_wall = None
            self.t0 = self.t1 = None

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.first_batch_wall = time.time()
            if batch == warmup:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch == steps - 1:
                self.t1 = time.perf_counter()

    timer = Timer()
    hist = model.fit(ds, epochs=1, steps_per_epoch=steps, callbacks=[timer], verbose=0)
    metrics = {
        "steps_per_sec": (steps - warmup) / (timer.t1 - timer.t0),
        "first_batch_wall": timer.first_batch_wall,
        "loss": float(hist.history["loss"][-1]),
        "replicas": workers,
    }
    # Ray Train 2.x keeps only metrics reported with a checkpoint in the
    # Result, so rank 0 attaches a tiny one (just these numbers).
    import json
    import tempfile
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "metrics.json"), "w") as f:
                json.dump(metrics, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--intra", type=int, default=1, help="TF intra-op threads (0: TF default)")
    p.add_argument("--inter", type=int, default=2, help="TF inter-op threads (0: TF default)")
    p.add_argument("--json", required=True, help="where to write the result")
    args = p.parse_args(argv)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    storage = tempfile.mkdtemp(prefix="bench_raytrain-", dir="/tmp")
    env = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=False)
    try:
        trainer = TensorflowTrainer(
            train_loop_per_worker,
            train_loop_config={"steps": args.steps, "warmup": args.warmup,
                               "batch_size": args.batch_size, "learning_rate": 0.05,
                               "momentum": 0.9, "intra": args.intra, "inter": args.inter},
            scaling_config=ScalingConfig(
                num_workers=args.workers, use_gpu=False,
                resources_per_worker={"CPU": args.cpus_per_worker}),
            run_config=RunConfig(name="bench", storage_path=storage))
        result = trainer.fit()
        if result.error is not None or not result.metrics:
            raise RuntimeError(f"Ray Train reported no metrics: {result!r}")
        out = dict(result.metrics)
        out["process_start"] = PROCESS_START
        with open(args.json, "w") as f:
            json.dump(out, f)
        print(json.dumps(out))
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
