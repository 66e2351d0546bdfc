"""Public model code: DeepCTR's DeepFM, a library-built Keras functional model
with embeddings.

DeepCTR (``pip install deepctr``, Apache-2.0, in the ``dev`` extra; pure Python,
it changes no TensorFlow, tf_keras, NumPy or Ray version) builds its models
from ``tensorflow.keras`` (Keras 2 here only through ``TF_USE_LEGACY_KERAS=1``,
which :mod:`distributed.tfworld` sets in every process). ``DeepFM`` is used as
its README shows: ``SparseFeat``/``DenseFeat`` columns in, a functional
``Model`` out, with a linear part, per-feature ``Embedding`` tables (with
L2 regularizers in ``model.losses``, which read each table whole, so their
gradients are dense), an FM interaction and a DNN
with batch norm (updates in ``model.updates``) and dropout. One sparse feature
is a raw string the model hashes itself (``use_hash=True``).

The model_fn (:mod:`tests.helpers.deepctr_models`, shared with the
parameter-server test) is the framework's Keras recipe (README "Keras 2 (tf_keras)
layers"): call the model on ``features`` with ``training``, hand the call's
updates and losses on with :mod:`distributed.model.keras`. Data: clicks from a fixed
random teacher, made in code.

The end-to-end test trains on 2 workers with evaluation, exports with
``python -m jobs.restore`` (a subprocess, ``TF_USE_LEGACY_KERAS`` unset), and
checks the SavedModel against a stock ``tf.compat.v1.train.Saver.restore`` of
the same checkpoint into DeepCTR's own graph (the functional model's own
``Input`` placeholders and outputs, no model_fn).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from distributed.model import TRAIN
from tests.helpers import deepctr_models  # imports no DeepCTR

deepctr_models.import_deepctr()  # skips this module without DeepCTR

from tests.helpers.deepctr_models import (  # noqa: E402
    click_rows, deepfm_model_fn, serve, stock_predictions)

MODELS = "tests.helpers.deepctr_models"


# ------------------------------------------------------------ unit tests ---

def test_deepfm_in_a_v1_graph_has_embeddings_updates_and_losses_of_the_call():
    from distributed.inputs.spec import InputSpec
    x, y = click_rows(32, seed=0)
    with tf.Graph().as_default() as graph:
        features, labels = InputSpec.from_batch(x, y, "clicks").placeholders()
        spec = deepfm_model_fn(features, labels, TRAIN, {})
        updates = graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
        names = {v.op.name for v in tf.compat.v1.global_variables()}
    assert {"sparse_emb_user/embeddings", "sparse_emb_item/embeddings",
            "sparse_emb_city/embeddings"} <= names
    assert [n for n in names if n.endswith("moving_mean")]
    assert len(updates) == 4  # two batch-norm layers, mean and variance each
    assert spec.loss.shape == ()


# ------------------------------------------------------------ end to end ---

STEPS = 40


@pytest.mark.slow
@pytest.mark.ray
def test_deepfm_trains_on_two_workers_evaluates_and_exports(storage, tmp_path):
    from distributed.checkpoint import RunLayout
    from tests.helpers.drivers import train_and_export

    run, export = "deepfm", tmp_path / "export"
    serving = train_and_export(MODELS, "deepfm_model_fn", "deepfm_input_fn",
                               "deepfm_eval_input_fn",
                               {"name": "adam", "learning_rate": 0.01},
                               storage, run, str(export), steps=STEPS)
    assert {"eval/auc", "eval/accuracy", "eval/loss"} <= set(serving[-1].metrics)
    assert serving[-1].metrics["eval/auc"] > 0.6, serving[-1].metrics
    prefix = os.path.join(RunLayout(storage, run).checkpoint_dir("serving", STEPS),
                          "model.ckpt")
    names = {n for n, _ in tf.train.list_variables(prefix)}
    assert not [n for n in names if "Adam" in n or n == "global_step"], names
    # The batch-norm statistics were trained (their updates ran) and are saved.
    reader = tf.train.load_checkpoint(prefix)
    means = [n for n in names if n.endswith("moving_mean")]
    assert len(means) == 2 and all(np.abs(reader.get_tensor(n)).max() > 0 for n in means)

    x, _ = click_rows(200, seed=99)
    got = serve(str(export / str(STEPS)), x)
    want = stock_predictions(prefix, x)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6), np.abs(got - want).max()
