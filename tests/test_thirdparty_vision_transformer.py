"""Public model code that nobody here wrote, run through the framework as a
user would run it: a model zoo's ``tf.compat.v1.layers`` ResNet with batch
norm in ``UPDATE_OPS`` (tensorflow/models) and a transformer with its own
optimizer (google-research/bert), both vendored unmodified under
``tests/thirdparty/`` with their licences.

Each trains on 2 workers on a real local Ray with evaluation, is exported by
``python -m jobs.restore`` in a fresh process (with ``TF_USE_LEGACY_KERAS``
unset: the job must set up its own TF world), and the SavedModel's outputs
equal those of a stock ``tf.compat.v1.train.Saver.restore`` of the same
checkpoint into a graph built by the original code alone. BERT's optimizer
never advances ``global_step``; bare, the framework stops the job with one
line, and wrapped in ``advancing_global_step`` it trains.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib  # also enters the one TF world
from distributed.checkpoint import Catalog, RunLayout
from distributed.errors import ConfigError
from distributed.examples import digits
from tests.conftest import REPO_ROOT
from tests.thirdparty import bert_classifier, bert_shim, resnet_digits

# The vendored code's own deprecation notices (tf.layers, keep_prob) are not news.
pytestmark = pytest.mark.filterwarnings("ignore:`tf.layers.*is deprecated:UserWarning")

THIRDPARTY = os.path.join(REPO_ROOT, "tests", "thirdparty")
STEPS = 40
SHORT = {"steps": STEPS, "log_every": 10, "cpus_per_worker": 0.5,
         "collective_timeout": 60.0,
         "checkpoint": {"serving_every": 10, "full_every": STEPS}}
"""The configs' runs, cut short: 40 steps, a serving checkpoint (and an
evaluation) every 10."""

UPSTREAM_BLOBS = {
    # tensorflow/models @ ad09cf49a8ec2757c475002909e029d1a9ade14c
    "tf_models_resnet/resnet_model.py": "d6449df5134646114e36c637f1184eb7a442f4f7",
    "tf_models_resnet/__init__.py": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
    "tf_models_resnet/LICENSE": "43fcf7bf1f1f9f824a1debf05d6ced45bf5810aa",
    # google-research/bert @ eedf5716ce1268e56f0a50264a88cafad334ac61
    "google_bert/modeling.py": "fed525971ca9ef440cbd78933d24e07896190a88",
    "google_bert/optimization.py": "d33dabd91dd965781d3dd912e0727ba23d7c2918",
    "google_bert/__init__.py": "effb57b1e893fc03b3782961deb060749083c696",
    "google_bert/LICENSE": "d645695673349e3947e8e5ae42332d0ac3164cd7",
}
"""Git blob ids of the vendored files in their upstream commits."""


def _git_blob_id(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ------------------------------------------------------------ unit tests ---

def test_vendored_files_are_the_upstream_files():
    changed = {name for name, blob in UPSTREAM_BLOBS.items()
               if _git_blob_id(os.path.join(THIRDPARTY, name)) != blob}
    assert not changed, f"vendored files differ from upstream: {sorted(changed)}"


def test_bert_loads_against_the_stand_in_and_leaves_tensorflow_alone():
    modeling = bert_shim.modeling()
    assert sys.modules["tensorflow"] is tf
    assert modeling.tf.contrib.layers.layer_norm is bert_shim.layer_norm
    assert modeling.tf.get_variable is tf.compat.v1.get_variable
    assert bert_shim.optimization().AdamWeightDecayOptimizer.__mro__[1] is \
        tf.compat.v1.train.Optimizer


def test_layer_norm_stand_in_makes_contribs_variables_and_values():
    x = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    with tf.Graph().as_default() as graph:
        with tf.compat.v1.variable_scope("attention"):
            out = bert_shim.layer_norm(tf.constant(x), begin_norm_axis=-1,
                                       begin_params_axis=-1)
        names = {v.op.name: v.shape.as_list() for v in tf.compat.v1.global_variables()}
        models = graph.get_collection(tf.compat.v1.GraphKeys.MODEL_VARIABLES)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            got = sess.run(out)
    assert names == {"attention/LayerNorm/beta": [8], "attention/LayerNorm/gamma": [8]}
    assert len(models) == 2
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-12), atol=1e-5)


def test_bert_optimizer_alone_leaves_global_step_and_the_wrapper_advances_it():
    """The bug the framework's check catches, in BERT's own optimizer."""
    from distributed.train.optimizers import advancing_global_step
    with tf.Graph().as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        w = tf.compat.v1.get_variable("w", [2], initializer=tf.compat.v1.ones_initializer())
        loss = tf.reduce_sum(tf.square(w))
        bare = bert_classifier.bert_optimizer(0.1)
        wrapped = advancing_global_step(bert_classifier.bert_optimizer(0.1))
        assert isinstance(wrapped, tf.compat.v1.train.Optimizer)
        ops = {}
        for scope, optimizer in (("bare", bare), ("wrapped", wrapped)):
            with tf.compat.v1.variable_scope(scope):  # BERT's slots: <scope>/w/adam_m
                ops[scope] = optimizer.apply_gradients(
                    optimizer.compute_gradients(loss), global_step=step)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(ops["bare"])
            assert sess.run(step) == 0
            sess.run(ops["wrapped"])
            sess.run(ops["wrapped"])
            assert sess.run(step) == 2
            assert sess.run(w)[0] < 1.0


def test_generated_task_is_deterministic_balanced_and_held_out():
    a = bert_classifier.token_arrays(512, 0, 5)
    b = bert_classifier.token_arrays(512, 0, 5)
    for key in bert_classifier.FEATURES:
        np.testing.assert_array_equal(a[0][key], b[0][key])
        assert a[0][key].dtype == np.int32 and a[0][key].shape == (512, 16)
    assert 0.3 < a[1].mean() < 0.7
    first = [next(bert_classifier.tokens_input_fn(w, 2, 16, {}))[0]["input_ids"]
             for w in (0, 1)]
    assert not np.array_equal(*first)
    held_out = list(bert_classifier.tokens_eval_input_fn(0, 1, 100, {}))
    assert [len(y) for _, y in held_out] == [100, 100, 56]


# ------------------------------------------------------------ end to end ---

def _config(name: str, storage: str, **overrides) -> config_lib.TrainConfig:
    """``tests/thirdparty/<name>.yaml`` cut short, in ``storage``."""
    loaded = config_lib.load(os.path.join(THIRDPARTY, f"{name}.yaml"),
                             {"storage": storage})
    return config_lib.from_dict({**loaded.to_dict(), **SHORT, **overrides})


def _train(config) -> tuple[dict, list[str]]:
    from distributed.train import trainer
    lines: list[str] = []
    summary = trainer.train(config, echo=lines.append)
    assert summary["steps"] == STEPS, lines
    return summary, lines


def _restore_job(storage: str, run: str, export: str) -> str:
    """Runs ``python -m jobs.restore`` as a user would, in a fresh process with
    ``TF_USE_LEGACY_KERAS`` unset; returns the export directory."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.restore", "--storage", storage, "--run", run,
         "--export", export], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    latest = Catalog(RunLayout(storage, run)).latest("serving")
    export_dir = os.path.join(export, str(latest.step))
    assert os.path.isfile(os.path.join(export_dir, "saved_model.pb")), os.listdir(export)
    return export_dir


def _served(export_dir: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    served = tf.saved_model.load(export_dir).signatures["serving_default"]
    return {k: v.numpy() for k, v in
            served(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def _stock_restore(build, prefix: str, inputs: dict[str, np.ndarray]):
    """``build(placeholders) -> logits`` in a fresh graph, every variable
    restored by a stock ``Saver`` from ``prefix``; the logits on ``inputs``."""
    graph = tf.Graph()
    with graph.as_default():
        placeholders = {k: tf.compat.v1.placeholder(tf.as_dtype(v.dtype),
                                                    [None, *v.shape[1:]], name=k)
                        for k, v in inputs.items()}
        logits = build(placeholders)
        saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session(graph=graph) as sess:
        saver.restore(sess, prefix)
        return sess.run(logits, {placeholders[k]: v for k, v in inputs.items()})


def _committed(storage: str, run: str):
    entries = Catalog(RunLayout(storage, run)).entries()
    serving = [e for e in entries if e.tier == "serving"]
    assert [e.step for e in serving] == list(range(10, STEPS + 1, 10)), entries
    # Evaluation never holds training up: a checkpoint that a newer one
    # overtakes is committed unevaluated; the last one is always evaluated.
    assert "eval/accuracy" in serving[-1].metrics, serving[-1]
    return serving


def _prefix(storage: str, run: str, tier: str, step: int) -> str:
    return os.path.join(RunLayout(storage, run).checkpoint_dir(tier, step), "model.ckpt")


def _check_accuracy(served: dict, labels: np.ndarray, entry) -> None:
    """The export classifies the eval examples as the evaluator scored them
    (within one example: an argmax on a tie may go either way)."""
    assert np.mean(served["classes"] == labels) == pytest.approx(
        entry.metrics["eval/accuracy"], abs=1.5 / len(labels))


def _check_outputs_equal(served: dict, logits: np.ndarray) -> None:
    np.testing.assert_allclose(served["logits"], logits, rtol=1e-5, atol=1e-5)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(served["probabilities"], e / e.sum(-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(served["classes"], logits.argmax(-1))


@pytest.mark.slow
@pytest.mark.ray
def test_tf_models_resnet_trains_evaluates_exports_and_serves_as_saver_restores(
        local_ray, storage, tmp_path):
    from tests.thirdparty.tf_models_resnet import resnet_model
    run = "thirdparty-resnet"
    _train(_config("resnet_digits", storage))
    serving = _committed(storage, run)
    prefix = _prefix(storage, run, "serving", STEPS)
    names = {n for n, _ in tf.train.list_variables(prefix)}
    stats = {n for n in names if "moving_" in n}
    assert len(stats) == 10 and "resnet_model/dense/kernel" in names, names
    assert "global_step" not in names and not [n for n in names if "Momentum" in n]
    reader = tf.train.load_checkpoint(prefix)
    for name in stats:  # batch norm's UPDATE_OPS ran: not the initial 0 and 1
        initial = 0.0 if name.endswith("moving_mean") else 1.0
        assert not np.allclose(reader.get_tensor(name), initial), name

    export_dir = _restore_job(storage, run, str(tmp_path / "export"))
    x, y = digits.digits_eval_arrays("test")  # the eval block's split
    served = _served(export_dir, x)
    # (At 40 steps near chance: the zoo's batch-norm decay, 0.997, has moved
    # the moving statistics a tenth of the way from their start.)
    _check_accuracy(served, y, serving[-1])

    def original(features):  # the model zoo's code alone
        model = resnet_model.Model(**resnet_digits.ARCHITECTURE)
        return model(tf.reshape(features["image"], [-1, 8, 8, 1]), training=False)

    _check_outputs_equal(served, _stock_restore(original, prefix, x))


@pytest.mark.slow
@pytest.mark.ray
def test_google_bert_trains_with_its_own_optimizer_exports_and_serves_as_saver_restores(
        local_ray, storage, tmp_path):
    run = "thirdparty-bert"
    schedule = {"schedule": "polynomial", "initial": 0.002, "decay_steps": STEPS,
                "end_learning_rate": 0.0, "power": 1.0, "warmup_steps": 4}
    config = _config("bert_classifier", storage)
    optimizer = {**config.to_dict()["optimizer"], "learning_rate": schedule}
    summary, lines = _train(config_lib.from_dict({**config.to_dict(),
                                                  "optimizer": optimizer}))
    serving = _committed(storage, run)
    # The wrapper advanced global_step once a step, so the schedule moved:
    # warmup to 0.002 at step 4, then down to 0 at step 40.
    rates = [r.learning_rate for r in summary["rounds"]]
    assert rates[0] > 0 and rates == sorted(rates, reverse=True), summary["rounds"]
    full = tf.train.load_checkpoint(_prefix(storage, run, "full", STEPS))
    assert full.get_tensor("global_step") == STEPS
    assert full.has_tensor("bert/embeddings/word_embeddings/adam_m")
    prefix = _prefix(storage, run, "serving", STEPS)
    names = {n for n, _ in tf.train.list_variables(prefix)}
    assert {"output_weights", "output_bias", "bert/embeddings/LayerNorm/gamma",
            "bert/encoder/layer_1/output/dense/kernel"} <= names, names
    assert not [n for n in names if "adam_" in n or n == "global_step"], names
    assert not [line for line in lines if "WARNING" in line], lines

    export_dir = _restore_job(storage, run, str(tmp_path / "export"))
    x, y = bert_classifier.token_arrays(bert_classifier.EVAL_EXAMPLES, 0, 0)
    served = _served(export_dir, x)  # the held-out examples the evaluator read
    _check_accuracy(served, y, serving[-1])

    def original(features):  # BERT's BertModel and run_classifier's head
        return bert_classifier.classifier(features, is_training=False)

    _check_outputs_equal(served, _stock_restore(original, prefix, x))


@pytest.mark.slow
@pytest.mark.ray
def test_bert_optimizer_unwrapped_stops_the_job_with_one_line_naming_global_step(
        local_ray, storage):
    from distributed.train import trainer
    config = _config("bert_classifier", storage, run="thirdparty-bert-bare")
    optimizer = {**config.to_dict()["optimizer"],
                 "name": "tests.thirdparty.bert_classifier:unwrapped_optimizer_fn"}
    config = config_lib.from_dict({**config.to_dict(), "optimizer": optimizer,
                                   "eval": None, "workers": 1})  # checked per worker
    with pytest.raises(ConfigError) as caught:
        trainer.train(config, echo=lambda line: None)
    message = str(caught.value)
    assert "\n" not in message.strip(), message
    assert "unwrapped_optimizer_fn did not advance global_step" in message, message
    assert "advancing_global_step" in message, message  # the fix
