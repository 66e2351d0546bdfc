"""The digits runs several test modules share: a small config trained by
``train()`` on the running local Ray, and what it wrote read back with stock
TensorFlow (a checkpoint's prefix, a serving checkpoint's accuracy, the
TensorBoard scalars)."""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import RunLayout
from distributed.examples import digits
from distributed.model import PREDICT
from distributed.train import trainer

MLP = "distributed.examples.digits:mlp_model_fn"
CNN = "distributed.examples.digits:cnn_bn_model_fn"

CNN_TRAINABLE = {f"cnn/conv_{i}/{name}" for i in (0, 1)
                 for name in ("kernel", "bn/gamma", "bn/beta")} | {
    "cnn/logits/kernel", "cnn/logits/bias"}
CNN_BN_STATS = {f"cnn/conv_{i}/bn/{name}" for i in (0, 1)
                for name in ("moving_mean", "moving_variance")}
MLP_TRAINABLE = {f"mlp/{layer}/{name}" for layer in ("dense_0", "dense_1", "logits")
                 for name in ("kernel", "bias")}


def make_config(storage: str, run: str, **overrides) -> config_lib.TrainConfig:
    """A run small enough for a shared CPU: the CNN on 2 workers of half a CPU,
    both tiers committed in 60 steps; ``overrides`` replace top-level fields."""
    data = {"storage": storage, "run": run, "model": CNN, "steps": 60,
            "batch_size": 32, "workers": 2, "cpus_per_worker": 0.5, "log_every": 20,
            "optimizer": {"name": "adam", "learning_rate": 0.01},
            "checkpoint": {"serving_every": 20, "full_every": 60},
            "retention": {"serving": {"keep_last": 10}, "full": {"keep_last": 10}},
            "collective_timeout": 60.0}
    data.update(overrides)
    return config_lib.from_dict(data)


def run_train(config):
    """Calls ``train`` directly; returns the summary and the echoed lines."""
    lines: list[str] = []
    summary = trainer.train(config, echo=lines.append)
    return summary, lines


def progress_losses(lines: list[str]) -> list[float]:
    """The mean losses of the progress lines, which is what a user watches."""
    return [float(m.group(1)) for m in
            (re.match(r"step \d+/\d+\s+mean loss (\S+)", line) for line in lines) if m]


def ckpt_prefix(storage: str, run: str, tier: str, step: int) -> str:
    """The prefix stock TF readers take (``tf.train.load_checkpoint``)."""
    return os.path.join(RunLayout(storage, run).checkpoint_dir(tier, step), "model.ckpt")


def serving_accuracy(model: str, prefix: str) -> tuple[float, set[str]]:
    """Test-split accuracy of a predict graph restored from ``prefix`` by a stock
    Saver; also returns the names of the predict graph's variables."""
    model_fn = getattr(digits, model.split(":")[1])
    x, y = digits.digits_eval_arrays("test")
    graph = tf.Graph()
    with graph.as_default():
        image = tf.compat.v1.placeholder(tf.float32, [None, 64])
        spec = model_fn({"image": image}, None, PREDICT, {})
        variables = {v.op.name: v for v in tf.compat.v1.global_variables()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
    with tf.compat.v1.Session(graph=graph) as sess:
        saver.restore(sess, prefix)
        classes = sess.run(spec.predictions["classes"], {image: x["image"]})
    return float(np.mean(classes == y)), set(variables)


def tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under ``logdir`` as TensorBoard itself loads it:
    ``{tag: [(step, value), ...]}`` in step order."""
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag))
            for tag in acc.Tags()["scalars"]}


def saved_variables(reader) -> set[str]:
    """The variables a checkpoint holds (a ``tf.train.load_checkpoint`` reader),
    without the workers' input positions a full checkpoint holds as well."""
    from distributed.train.positions import PREFIX
    return {name for name in reader.get_variable_to_shape_map()
            if not name.startswith(PREFIX)}
