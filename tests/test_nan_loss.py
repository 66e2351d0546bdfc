"""A loss that becomes NaN on a real local Ray: the job stops with a message,
and what it committed before holds no NaN and still restores.

``tests/test_bad_input.py`` checks the message; this checks the checkpoints
the README promises are kept ("none with the bad values"). The NaN comes from
the input at a checkpoint step, so a worker that saved before looking at the
loss would commit NaN weights.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from distributed.checkpoint import Catalog, RunLayout, verify_checkpoint
from distributed.errors import DistributedError
from distributed.examples import digits
from distributed.model import PREDICT
from distributed.serving import job
from distributed.train import trainer
from tests.helpers.training import make_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAN_STEP = 20  # a checkpoint step of both tiers


def nan_sensitive_model_fn(features, labels, mode, params):
    """The digits MLP whose training loss also reads the raw input (as a
    reconstruction term would): a NaN image makes the loss, the gradients and
    so every updated variable NaN. (The plain MLP's ReLU turns NaN inputs
    into zeros, so its loss stays finite.)"""
    spec = digits.mlp_model_fn(features, labels, mode, params)
    if spec.loss is None:
        return spec
    poison = 0.0 * tf.reduce_sum(tf.cast(features["image"], tf.float32))
    return dataclasses.replace(spec, loss=spec.loss * (1.0 + poison))


def nan_input_fn(worker_index, num_workers, batch_size, params):
    """The digits, except that from step ``params["nan_from_step"]`` on (the
    batch of step ``s`` is the ``s``-th one) every image is NaN."""
    batches = digits.digits_input_fn(worker_index, num_workers, batch_size, {})
    for step, (features, labels) in enumerate(batches, start=1):
        if step >= params["nan_from_step"]:
            features = {k: np.full_like(v, np.nan) for k, v in features.items()}
        yield features, labels


def test_nan_loss_stops_the_job_and_keeps_only_finite_checkpoints(local_ray, tmp_path):
    storage = str(tmp_path / "storage")
    config = make_config(storage, "nan", model="tests.test_nan_loss:nan_sensitive_model_fn",
                         steps=40, log_every=5,
                         input="tests.test_nan_loss:nan_input_fn",
                         input_params={"nan_from_step": NAN_STEP},
                         checkpoint={"serving_every": 5, "full_every": 10},
                         max_failures=0)
    lines: list[str] = []
    with pytest.raises(DistributedError, match=rf"loss became nan at step {NAN_STEP}\b.*"
                       r"lower optimizer\.learning_rate") as caught:
        trainer.train(config, echo=lines.append)
    assert "\n" not in str(caught.value)

    run_layout = RunLayout(storage, "nan")
    entries = Catalog(run_layout).entries()
    # Everything before the NaN step is kept (the save in flight included);
    # nothing of the NaN step is.
    assert sorted((e.step, e.tier) for e in entries) == [
        (5, "serving"), (10, "full"), (10, "serving"), (15, "serving")], lines
    for entry in entries:
        ckpt_dir = os.path.join(run_layout.root, entry.path)
        verify_checkpoint(ckpt_dir, manifest_crc32c=entry.manifest_crc32c)
        reader = tf.train.load_checkpoint(os.path.join(ckpt_dir, "model.ckpt"))
        floats = [name for name, dtype in reader.get_variable_to_dtype_map().items()
                  if dtype.is_floating]
        assert floats, entry
        bad = [name for name in floats if not np.isfinite(reader.get_tensor(name)).all()]
        assert not bad, f"{entry.tier} step {entry.step} holds NaN/inf in {bad}"

    # The last good serving checkpoint restores through the restore job ...
    images = digits.digits_eval_arrays("test")[0]["image"][:20]
    result = job.restore_once(storage, "nan", str(tmp_path / "export"), echo=lambda s: None)
    assert result.step == 15
    loaded = tf.saved_model.load(result.export_dir)
    logits = loaded.signatures["serving_default"](image=tf.constant(images))["logits"]
    assert np.isfinite(logits.numpy()).all()

    # ... and the last full one (what a resume reads) into a stock Saver.
    graph = tf.Graph()
    with graph.as_default():
        image = tf.compat.v1.placeholder(tf.float32, [None, 64])
        spec = digits.mlp_model_fn({"image": image}, None, PREDICT, {})
        saver = tf.compat.v1.train.Saver(var_list=tf.compat.v1.global_variables())
    with tf.compat.v1.Session(graph=graph) as sess:
        saver.restore(sess, os.path.join(run_layout.checkpoint_dir("full", 10), "model.ckpt"))
        assert np.isfinite(sess.run(spec.predictions["logits"], {image: images})).all()
