#!/usr/bin/env python
"""The Ray Train baseline of ``bench_train.py``: ``TensorflowTrainer`` +
``MultiWorkerMirroredStrategy`` on the digits MLP (64 -> 256 -> 256 -> 10),
built with tf_keras, CPU workers. Run as its own process by the benchmark:

    python scripts/_bench_raytrain.py --style strong --steps 1500 --warmup 300 --json out.json

Styles (``--style``):

* ``strong`` (default): the custom loop a tuned MWMS user writes: a
  ``@tf.function`` step calling ``strategy.run``, ``strategy.reduce`` of the
  loss, ``distribute_datasets_from_function`` with an explicit
  ``shard(num_input_pipelines, input_pipeline_id)`` and a per-replica batch of
  ``--batch-size``, TF's default thread pools, no per-batch Python.
  ``--steps-per-call K`` runs K steps per ``tf.function`` call (a
  ``tf.range`` loop, Keras' ``steps_per_execution``).
* ``fit``: ``model.fit`` on one global-batch dataset (MWMS auto-shards it by
  DATA) with a tf_keras callback on every batch, which also does the timing.

Both time steps ``warmup + 1 .. steps`` (the steady-state window) and stamp
the wall clock just before the first step; rank 0 reports both through
``ray.train.report`` and this script writes the result (plus its own start
time) as JSON.
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


def _report(metrics: dict) -> None:
    """Rank 0 reports ``metrics`` with a tiny checkpoint: Ray Train 2.x keeps
    only metrics reported with one in the Result."""
    import json
    import tempfile

    import ray.train
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "metrics.json"), "w") as f:
                json.dump(metrics, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def _setup(cfg: dict):
    import os
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tensorflow as tf

    if cfg["intra"]:
        tf.config.threading.set_intra_op_parallelism_threads(cfg["intra"])
    if cfg["inter"]:
        tf.config.threading.set_inter_op_parallelism_threads(cfg["inter"])
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    from sklearn.datasets import load_digits
    data = load_digits()
    x = (data.data[:1500] / 16.0).astype(np.float32)
    y = data.target[:1500].astype(np.int64)
    return tf, strategy, x, y


def _model(cfg: dict):
    import tf_keras
    return tf_keras.Sequential([
        tf_keras.layers.InputLayer(input_shape=(64,)),
        tf_keras.layers.Dense(256, activation="relu"),
        tf_keras.layers.Dense(256, activation="relu"),
        tf_keras.layers.Dense(10),
    ])


def train_loop_fit(cfg: dict) -> None:
    """``model.fit`` with a timing callback on every batch; one global-batch
    dataset that MWMS auto-shards (by DATA: every worker builds each global
    batch and keeps its half)."""
    import time

    import tf_keras
    tf, strategy, x, y = _setup(cfg)
    workers = strategy.num_replicas_in_sync
    # The dataset's batch is the global batch; the strategy shards the data and
    # gives each worker batch_size (same per-worker batch as ours).
    ds = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(1500, seed=0).repeat()
          .batch(cfg["batch_size"] * workers, drop_remainder=True).prefetch(2))

    with strategy.scope():
        model = _model(cfg)
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
    _report({
        "style": "fit",
        "steps_per_sec": (steps - warmup) / (timer.t1 - timer.t0),
        "timed_steps": steps - warmup,
        "first_batch_wall": timer.first_batch_wall,
        "loss": float(hist.history["loss"][-1]),
        "replicas": workers,
    })


def train_loop_strong(cfg: dict) -> None:
    """A custom loop as a tuned MWMS user writes it: ``@tf.function`` step(s)
    calling ``strategy.run``, ``strategy.reduce`` of the loss, per-worker
    input from ``distribute_datasets_from_function`` with an explicit
    ``shard(num_input_pipelines, input_pipeline_id)``, no per-batch Python.

    ``steps_per_call`` > 1 runs that many steps in one ``tf.function`` call
    (a ``tf.range`` loop: what ``steps_per_execution`` does in Keras).
    """
    import time

    import tf_keras
    tf, strategy, x, y = _setup(cfg)
    workers = strategy.num_replicas_in_sync
    per_replica = cfg["batch_size"]
    global_batch = per_replica * workers
    k = cfg["steps_per_call"]
    steps, warmup = cfg["steps"], cfg["warmup"]
    if steps % k or warmup % k:
        raise ValueError(f"steps ({steps}) and warmup ({warmup}) must be multiples "
                         f"of steps_per_call ({k})")

    def dataset_fn(ctx: tf.distribute.InputContext):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return (ds.cache().shuffle(1500, seed=ctx.input_pipeline_id).repeat()
                .batch(ctx.get_per_replica_batch_size(global_batch), drop_remainder=True)
                .prefetch(tf.data.AUTOTUNE))

    dist_ds = strategy.distribute_datasets_from_function(dataset_fn)
    it = iter(dist_ds)

    with strategy.scope():
        model = _model(cfg)
        optimizer = tf_keras.optimizers.SGD(cfg["learning_rate"], momentum=cfg["momentum"])
        model.build((None, 64))
    loss_obj = tf_keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf_keras.losses.Reduction.NONE)

    def step_fn(inputs):
        features, labels = inputs
        with tf.GradientTape() as tape:
            logits = model(features, training=True)
            loss = tf.nn.compute_average_loss(loss_obj(labels, logits),
                                              global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    if k == 1:
        @tf.function
        def train_step(iterator):
            per_replica_loss = strategy.run(step_fn, args=(next(iterator),))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)
    else:
        @tf.function
        def train_step(iterator):
            loss = tf.constant(0.0)
            for _ in tf.range(k):
                per_replica_loss = strategy.run(step_fn, args=(next(iterator),))
                loss = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss,
                                       axis=None)
            return loss

    first_batch_wall = time.time()
    loss = None
    t0 = None
    for call in range(steps // k):
        if call * k == warmup:
            loss.numpy()  # the warm-up steps are done
            t0 = time.perf_counter()
        loss = train_step(it)
    final = float(loss.numpy())
    t1 = time.perf_counter()
    _report({
        "style": "strong" if k == 1 else f"strong-k{k}",
        "steps_per_sec": (steps - warmup) / (t1 - t0),
        "timed_steps": steps - warmup,
        "first_batch_wall": first_batch_wall,
        "loss": final,
        "replicas": workers,
    })


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--style", choices=("strong", "fit"), default="strong")
    p.add_argument("--steps-per-call", type=int, default=1,
                   help="strong: steps per tf.function call (tf.range loop; default 1)")
    p.add_argument("--intra", type=int, default=0, help="TF intra-op threads (0: TF default)")
    p.add_argument("--inter", type=int, default=0, help="TF inter-op threads (0: TF default)")
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
        loop = train_loop_fit if args.style == "fit" else train_loop_strong
        trainer = TensorflowTrainer(
            loop,
            train_loop_config={"steps": args.steps, "warmup": args.warmup,
                               "steps_per_call": args.steps_per_call,
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
