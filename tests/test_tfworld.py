"""One TF world: every process that builds the user's graph gets Keras 2
routing from :mod:`distributed.tfworld`, with ``TF_USE_LEGACY_KERAS`` unset in
the user's environment.

A ``tf.compat.v1.layers`` model with batch norm (Keras 2 only in TF 2.16+)
trains with evaluation on 2 workers through ``jobs.train`` (driver, workers,
coordinator, evaluator), exports through ``jobs.restore``, is compared through
``ckpt diff`` (the checkpoint CLI), and its SavedModel classifies digits.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_USE_LEGACY_KERAS", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def watch_once(storage: str, export: str) -> str:
    """``jobs.restore --watch`` until its first export, then SIGTERM; its output."""
    import signal
    import time
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_USE_LEGACY_KERAS", "RAY_ADDRESS")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.restore", "--storage", storage, "--run",
         "digits-layers", "--export", export, "--watch", "--poll", "0.5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (
            os.path.isdir(export) and any(n.isdigit() for n in os.listdir(export))):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out


@pytest.mark.parametrize("order", ["distributed first", "tensorflow first"])
def test_importing_distributed_routes_keras_2(order):
    first, second = ("distributed", "tensorflow as tf") if order == "distributed first" \
        else ("tensorflow as tf", "distributed")
    proc = run("-c", f"import {first}; import {second}\n"
                     "import tensorflow as tf\n"
                     "print(tf.compat.v1.layers.dense.__module__, tf.keras.__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tf_keras.src.legacy_tf_layers.core",
                                   "tf_keras.api._v2.keras"], proc.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_layers_model_trains_evaluates_exports_and_classifies(tmp_path):
    storage, export = str(tmp_path / "runs"), str(tmp_path / "export")
    train = run("-m", "jobs.train", "--config", "jobs/configs/digits_layers.yaml",
                "--steps", "200", "--storage", storage)
    assert train.returncode == 0, train.stdout + train.stderr
    assert "eval/accuracy" in train.stdout, train.stdout
    restore = run("-m", "jobs.restore", "--storage", storage, "--run", "digits-layers",
                  "--export", export, "--best", "eval/accuracy:max")
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert "inputs: image float32 [-1, 64]" in restore.stdout, restore.stdout
    watched = watch_once(storage, str(tmp_path / "watched"))
    assert "exported step" in watched, watched
    diff = run("-m", "distributed.ckpt", "diff", "--storage", storage, "--run",
               "digits-layers", "100", "200")
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert "layers_cnn/bn_0/moving_mean" in diff.stdout, diff.stdout

    import tensorflow as tf

    from distributed.examples.digits import digits_eval_arrays
    (version,) = os.listdir(export)
    x, y = digits_eval_arrays("test")
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"],
                                                    os.path.join(export, version))
        signature = meta.signature_def["serving_default"]
        classes = sess.run(signature.outputs["classes"].name,
                           {signature.inputs["image"].name: x["image"]})
    assert np.mean(classes == y) > 0.85
