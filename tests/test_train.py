"""Data-parallel training end to end on one real local Ray, with real TF.

Each test calls :func:`distributed.train.trainer.train` (or drives its actors
the same way) with a small config in a temp dir, then reads what it wrote
with stock TensorFlow (``tf.train.list_variables``, ``tf.train.load_checkpoint``,
``Saver.restore``) and the catalog. One module-scoped Ray serves every test:
``connect_ray()`` joins an initialized Ray and leaves it running.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import ray
import tensorflow as tf

from distributed.checkpoint import Catalog, RunLayout
from distributed.errors import ConfigError, DistributedError, SelectionError
from distributed.examples import digits
from distributed.train import cluster
from distributed.train.coordinator import Coordinator
from tests.conftest import LOCAL_RAY_CPUS
from tests.helpers.drivers import actor_group, prepare, wait_for_free_cpus
from tests.helpers.gpus import gpus_visible
from tests.helpers.training import (CNN, CNN_BN_STATS, CNN_TRAINABLE, MLP, MLP_TRAINABLE,
                                    ckpt_prefix, make_config, progress_losses, run_train,
                                    saved_variables, serving_accuracy, tensorboard_scalars)

pytestmark = pytest.mark.ray

OPTIMIZER_STATE = re.compile(r"(/Adam(_1)?$|^beta[12]_power$|^global_step$)")


def ckpt_names(storage: str, run: str, tier: str, step: int) -> set[str]:
    return saved_variables(tf.train.load_checkpoint(ckpt_prefix(storage, run, tier, step)))


# ------------------------------------------------------------ training -----

def test_mlp_loss_drops_catalog_records_loss_and_keep_last_applies(local_ray, storage):
    gcs = ray.get_runtime_context().gcs_address
    config = make_config(storage, "mlp", model=MLP, steps=80,
                         selection={"policy": "trainable"},
                         checkpoint={"serving_every": 20, "full_every": 40},
                         retention={"serving": {"keep_last": 2}, "full": {"keep_last": 1}})
    summary, lines = run_train(config)

    # connect_ray() joined the running Ray and did not shut it down.
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == gcs
    assert summary["steps"] == 80
    losses = progress_losses(lines)
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], lines
    assert not [line for line in lines if line.startswith("WARNING")]

    prefix = ckpt_prefix(storage, "mlp", "serving", 80)
    accuracy, predict_vars = serving_accuracy(MLP, prefix)
    assert accuracy > 0.85
    assert ckpt_names(storage, "mlp", "serving", 80) == MLP_TRAINABLE == predict_vars

    # keep_last ran during training: older checkpoints are gone, rows and dirs.
    catalog = Catalog(RunLayout(storage, "mlp"))
    assert [e.step for e in catalog.entries("serving")] == [60, 80]
    assert [e.step for e in catalog.entries("full")] == [80]
    for tier, step in [("serving", 20), ("serving", 40), ("full", 40)]:
        assert not os.path.exists(RunLayout(storage, "mlp").checkpoint_dir(tier, step))
    deleted = sorted(s for e in summary["events"] if e.kind == "committed"
                     for s in e.retention_deleted)
    assert deleted == [20, 40, 40]
    assert [(e["tier"], e["step"]) for e in summary["entries"]] == [
        ("full", 80), ("serving", 60), ("serving", 80)]

    # Every row carries the loss, so best() works on it.
    entries = catalog.entries()
    assert all(set(e.metrics) == {"loss"} and np.isfinite(e.metrics["loss"])
               for e in entries)
    best = catalog.best("loss")
    assert best.tier == "serving"
    serving_losses = [e.metrics["loss"] for e in catalog.entries("serving")]
    assert best.metrics["loss"] == min(serving_losses)
    assert catalog.best("loss", tier="full").step == 80

    # TensorBoard: the coordinator's event files under the run hold the
    # training curve and every checkpoint's save figures.
    scalars = tensorboard_scalars(os.path.join(storage, "mlp", "tensorboard"))
    assert [s for s, _ in scalars["train/loss"]] == [20, 40, 60, 80]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(losses, abs=5e-5)
    for tag in ("train/steps_per_sec", "train/examples_per_sec",
                "checkpoint/rank0_stall_seconds_total"):
        assert len(scalars[tag]) == 4 and all(v >= 0 for _, v in scalars[tag]), tag
    steps_s = dict(scalars["train/steps_per_sec"])
    assert dict(scalars["train/examples_per_sec"]) == pytest.approx(
        {k: v * 32 * 2 for k, v in steps_s.items()})
    assert [s for s, _ in scalars["checkpoint/serving/bytes"]] == [20, 40, 60, 80]
    assert [s for s, _ in scalars["checkpoint/full/save_seconds"]] == [40, 80]
    assert {v for _, v in scalars["checkpoint/full/bytes"]} == {
        e["num_bytes"] for e in summary["entries"] if e["tier"] == "full"}


def test_cnn_loss_drops_and_inference_checkpoint_holds_bn_stats_only(local_ray, storage):
    summary, lines = run_train(make_config(storage, "cnn", steps=60,
                                           selection={"policy": "inference"}))
    losses = progress_losses(lines)
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], lines
    assert not [line for line in lines if line.startswith("WARNING")]

    serving = ckpt_names(storage, "cnn", "serving", 60)
    assert serving == CNN_TRAINABLE | CNN_BN_STATS
    assert not [n for n in serving if OPTIMIZER_STATE.search(n)]
    full = ckpt_names(storage, "cnn", "full", 60)
    assert serving < full
    assert {"global_step", "beta1_power", "beta2_power",
            "cnn/conv_0/kernel/Adam", "cnn/conv_0/kernel/Adam_1"} <= full
    assert full - serving == {n for n in full if OPTIMIZER_STATE.search(n)}
    assert tf.train.load_checkpoint(ckpt_prefix(storage, "cnn", "full", 60)
                                    ).get_tensor("global_step") == 60

    # Servable with stock TF: the predict graph reads exactly what was saved,
    # and the moving statistics are trained values, not their initial 0 / 1.
    prefix = ckpt_prefix(storage, "cnn", "serving", 60)
    accuracy, predict_vars = serving_accuracy(CNN, prefix)
    assert predict_vars == serving
    assert accuracy > 0.8
    reader = tf.train.load_checkpoint(prefix)
    assert np.abs(reader.get_tensor("cnn/conv_0/bn/moving_mean")).max() > 1e-3
    assert summary["entries"][-1]["selection"] == (
        '{"exclude": [], "include": [], "policy": "inference"}')


def test_trainable_policy_on_cnn_drops_bn_stats_and_warns(local_ray, storage):
    _, lines = run_train(make_config(storage, "cnn-trainable", steps=10, log_every=10,
                                     selection={"policy": "trainable"},
                                     checkpoint={"serving_every": 0, "full_every": 0}))
    assert ckpt_names(storage, "cnn-trainable", "serving", 10) == CNN_TRAINABLE
    warnings = [line for line in lines if line.startswith("WARNING: ")]
    assert len(warnings) == 1, lines
    for name in CNN_BN_STATS:
        assert name in warnings[0]
    assert "policy: inference" in warnings[0]


def test_include_exclude_regexes_end_to_end(local_ray, storage):
    selection = {"policy": "inference", "include": ["^cnn/conv_"],
                 "exclude": ["moving_variance$", r"conv_1/kernel"]}
    _, lines = run_train(make_config(storage, "regex", steps=10, log_every=10,
                                     selection=selection,
                                     checkpoint={"serving_every": 0, "full_every": 0}))
    expected = {"cnn/conv_0/kernel", "cnn/conv_0/bn/gamma", "cnn/conv_0/bn/beta",
                "cnn/conv_0/bn/moving_mean", "cnn/conv_1/bn/gamma", "cnn/conv_1/bn/beta",
                "cnn/conv_1/bn/moving_mean"}
    assert ckpt_names(storage, "regex", "serving", 10) == expected
    # The full tier ignores the selection.
    full = ckpt_names(storage, "regex", "full", 10)
    assert CNN_TRAINABLE | CNN_BN_STATS < full
    # The dropped variables the outputs read are named in a warning.
    warnings = [line for line in lines if line.startswith("WARNING: ")]
    assert len(warnings) == 1, lines
    for name in ("cnn/conv_0/bn/moving_variance", "cnn/conv_1/bn/moving_variance",
                 "cnn/conv_1/kernel", "cnn/logits/kernel", "cnn/logits/bias"):
        assert name in warnings[0]
    assert "regexes drop them" in warnings[0]
    entry = Catalog(RunLayout(storage, "regex")).get(10, "serving")
    assert entry.num_tensors == len(expected)
    assert '"include": ["^cnn/conv_"]' in entry.selection


# -------------------------------------------------------------- resume -----

def exponential_lr(step: int) -> float:
    """LR_RESUME's learning rate at global step ``step`` (closed form)."""
    return 0.01 * 0.5 ** (step / 10)


LR_RESUME = {"name": "adam", "learning_rate": {
    "schedule": "exponential", "initial": 0.01, "decay_steps": 10, "decay_rate": 0.5}}


@pytest.mark.slow
def test_full_checkpoint_resumes_with_step_slots_and_the_learning_rate_schedule(
        local_ray, storage):
    """A resumed run starts from the full checkpoint's values, the optimizer's
    slots and clock (Adam's beta powers) and the global step included, so its
    learning-rate schedule (which runs on the global step) goes on where it
    was; ``train/learning_rate`` records it."""
    common = dict(model=MLP, optimizer=LR_RESUME, log_every=10,
                  checkpoint={"serving_every": 20, "full_every": 40})
    run_train(make_config(storage, "resume", steps=40, **common))
    full40 = tf.train.load_checkpoint(ckpt_prefix(storage, "resume", "full", 40))
    assert full40.get_tensor("global_step") == 40
    # Adam's beta1_power is 0.9 ** (steps + 1): a clock of the optimizer state.
    np.testing.assert_allclose(full40.get_tensor("beta1_power"), 0.9 ** 41, rtol=1e-5)

    # What a resumed run starts from equals the full checkpoint, slots included
    # (the coordinator in this process, built exactly as the trainer builds it).
    second = make_config(storage, "resume", steps=70, **common)
    coordinator = Coordinator(second.to_dict())
    try:
        plan = prepare(coordinator)
        assert (plan.opened.start_step, plan.opened.resumed_from) == (40, 40)
        values = coordinator.initial_values()
    finally:
        coordinator.sess.close()
    saved = saved_variables(full40)
    assert set(values) == saved
    assert {n for n in values if "/Adam" in n}  # the slots are there
    for name in saved:
        np.testing.assert_array_equal(values[name], full40.get_tensor(name), err_msg=name)

    summary, lines = run_train(second)
    assert any("resuming run 'resume' from its full checkpoint at step 40" in line
               for line in lines), lines
    progress = [line for line in lines if re.match(r"step \d+/", line)]
    assert [p.split()[1] for p in progress] == ["50/70", "60/70", "70/70"]
    assert summary["steps"] == 70
    full70 = tf.train.load_checkpoint(ckpt_prefix(storage, "resume", "full", 70))
    assert full70.get_tensor("global_step") == 70
    np.testing.assert_allclose(full70.get_tensor("beta1_power"), 0.9 ** 71, rtol=1e-5)
    catalog = Catalog(RunLayout(storage, "resume"))
    assert [e.step for e in catalog.entries("serving")] == [20, 40, 60, 70]
    assert [e.step for e in catalog.entries("full")] == [40, 70]
    # Each round reports the rate its last step used: global step (round end - 1).
    rates = {r.step: r.learning_rate for r in summary["rounds"]}
    assert sorted(rates) == [50, 60, 70]
    assert [rates[s] for s in (50, 60, 70)] == pytest.approx(
        [exponential_lr(s - 1) for s in (50, 60, 70)], rel=1e-5)
    logged = dict(tensorboard_scalars(os.path.join(storage, "resume", "tensorboard"))
                  ["train/learning_rate"])
    assert sorted(logged) == [10, 20, 30, 40, 50, 60, 70]
    assert [logged[s] for s in sorted(logged)] == pytest.approx(
        [exponential_lr(s - 1) for s in sorted(logged)], rel=1e-5)


# ------------------------------------------------------------ replicas -----

TFDATA = "distributed.examples.digits_inputs:digits_dataset_input_fn"


# RMSProp with a warmed-up cosine schedule and clipping after the all-reduce.
CLIPPED_RMSPROP = {"name": "rmsprop", "clip_global_norm": 1.0, "learning_rate": {
    "schedule": "cosine", "initial": 0.01, "decay_steps": 30, "warmup_steps": 5}}


def cosine_warmup_lr(step: int) -> float:
    """CLIPPED_RMSPROP's learning rate at global step ``step`` (closed form)."""
    return 0.01 * 0.5 * (1 + np.cos(np.pi * min(step, 30) / 30)) * min(1.0, step / 5)


EMBEDDING = "distributed.examples.embedding"
# A 5000 x 16 table read by 32 x 8 ids a worker: its gradient is all-gathered
# (2 x 256 rows x 72 bytes <= 0.5 x 320,000 bytes), and Adagrad applies it sparsely.
EMBEDDING_ADAGRAD = {"model_params": {"vocab": 5000}, "input_params": {"vocab": 5000},
                     "optimizer": {"name": "adagrad", "learning_rate": 0.5}}


def _gathers_sparse_gradients(config) -> bool:
    """Whether the workers' graph of ``config`` all-gathers a sparse gradient."""
    import functools

    from distributed.inputs.spec import InputSpec
    from distributed.train import collective
    from distributed.train.graph import build_train_graph
    reduce_fn = functools.partial(
        collective.allreduce_gradients,
        spec=collective.GroupSpec(("127.0.0.1:1", "127.0.0.1:2"), 0),
        sparse_density_threshold=config.sparse_density_threshold,
        batch_size=config.batch_size)
    spec = InputSpec({"ids": ("int64", (8,))}, ("int64", ()))
    graph = build_train_graph(config, spec, reduce_fn=reduce_fn).graph
    return any(op.type == "CollectiveGatherV2" for op in graph.get_operations())


@pytest.mark.parametrize("model,input_fn,overrides", [
    (CNN, digits.__name__ + ":digits_input_fn", {}),
    ("tests.helpers.scoped_models:ref_variables_model_fn",
     digits.__name__ + ":digits_input_fn", {}),
    (CNN, TFDATA, {}),
    (CNN, digits.__name__ + ":digits_input_fn", {"optimizer": CLIPPED_RMSPROP}),
    (f"{EMBEDDING}:embedding_model_fn", f"{EMBEDDING}:embedding_input_fn",
     EMBEDDING_ADAGRAD),
    # 4 steps per Session.run: runs end at 4, 8, 10 (a checkpoint), 14, ...
    (CNN, digits.__name__ + ":digits_input_fn",
     {"optimizer": CLIPPED_RMSPROP, "steps_per_run": 4})],
    ids=["cnn", "tf1-reference-variables", "cnn-tfdata", "cnn-rmsprop-clip-cosine",
         "embedding-sparse-adagrad", "cnn-rmsprop-steps-per-run-4"])
def test_replicas_stay_identical_and_snapshots_are_consistent(local_ray, storage, model,
                                                              input_fn, overrides):
    """Drives the actors as ``train()`` does, to read every worker's variables."""
    config = make_config(storage, "replicas", steps=30, model=model, input=input_fn,
                         checkpoint={"serving_every": 0, "full_every": 10}, **overrides)
    if overrides is EMBEDDING_ADAGRAD:
        assert _gathers_sparse_gradients(config)
    with actor_group(config) as (coordinator, workers, plan, setups, initial):
        assert [s.input_spec for s in setups] == [plan.build.input_spec] * 2
        ray.get([w.train.remote(10) for w in workers])
        at10 = ray.get([w.variables.remote() for w in workers])
        reports = ray.get([w.train.remote(30) for w in workers])
        at30 = ray.get([w.variables.remote() for w in workers])
        events = list(reports[0].events) + ray.get(workers[0].finish.remote())

    for snapshot, step in ((at10, 10), (at30, 30)):
        lead, other = snapshot
        assert set(lead) == set(other) == set(initial)
        for name in lead:
            np.testing.assert_allclose(other[name], lead[name], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name} at step {step}")
        assert int(lead["global_step"]) == step
        # The workers saw different data, yet their BN statistics agree (and moved).
        for name in CNN_BN_STATS if model == CNN else ():
            assert not np.allclose(lead[name], initial[name]), name
        if overrides is EMBEDDING_ADAGRAD:  # the rows looked up moved
            assert not np.allclose(lead["embedding/table"], initial["embedding/table"])
    assert reports[0].step == 30 and not [e for e in events if e.kind != "committed"]
    if overrides.get("optimizer") is CLIPPED_RMSPROP:  # the last step's (29) rate
        assert [r.learning_rate for r in reports] == pytest.approx(
            [cosine_warmup_lr(29)] * 2, rel=1e-5)
        assert {"cnn/logits/kernel/RMSProp", "cnn/logits/kernel/RMSProp_1"} <= set(at30[0])

    # Rank 0's async snapshots equal the variables at their step, although
    # training went on while the step-10 checkpoint was handed off and written.
    for values, step in ((at10[0], 10), (at30[0], 30)):
        reader = tf.train.load_checkpoint(ckpt_prefix(storage, "replicas", "full", step))
        assert saved_variables(reader) == set(values)
        for name, value in values.items():
            np.testing.assert_array_equal(reader.get_tensor(name), value,
                                          err_msg=f"{name} at step {step}")


# -------------------------------------------------------------- errors -----

@pytest.mark.parametrize("overrides,error,match", [
    ({"model": "no_such_module_for_tests:model_fn"}, ConfigError,
     r"^model: cannot import module 'no_such_module_for_tests'"),
    ({"model": "distributed.examples.digits:no_such_model_fn"}, ConfigError,
     r"^model: module 'distributed.examples.digits' has no function 'no_such_model_fn'"),
    ({"model": MLP, "selection": {"policy": "trainable", "include": ["^nothing/"]}},
     SelectionError, r"matches no variable.*mlp/dense_0/kernel"),
    ({"gpus_per_worker": 4.0}, ConfigError, r"^gpus_per_worker: .* need 8 GPUs"),
], ids=["module-does-not-import", "no-such-function", "selection-matches-nothing",
        "more-gpus-than-the-cluster"])
def test_user_errors_come_back_as_distributed_errors(local_ray, storage, overrides,
                                                     error, match):
    config = make_config(storage, "bad", steps=5, **overrides)
    with pytest.raises(error, match=match) as info:
        run_train(config)
    assert isinstance(info.value, DistributedError)
    assert not isinstance(info.value, ray.exceptions.RayError)
    assert ray.is_initialized()
    assert wait_for_free_cpus(LOCAL_RAY_CPUS) == LOCAL_RAY_CPUS  # the trainer killed its actors
    if os.path.isdir(os.path.join(storage, "bad")):  # the coordinator got that far
        assert Catalog(RunLayout(storage, "bad")).entries() == []


# ----------------------------------------------------------------- GPU -----

@pytest.mark.gpu
@pytest.mark.slow
def test_one_gpu_worker_uses_nccl_and_trains(local_ray, storage):
    if gpus_visible() == 0:
        pytest.skip("no GPU visible to TensorFlow")
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray sees no GPU")

    @ray.remote(num_gpus=1)
    def hint():
        from distributed.train.collective import GroupSpec
        return GroupSpec(("127.0.0.1:1",), 0).resolved_hint()

    assert ray.get(hint.options(runtime_env={
        "env_vars": cluster.actor_env_vars()}).remote()) == "nccl"
    summary, lines = run_train(make_config(storage, "gpu", model=MLP, workers=1,
                                           gpus_per_worker=1.0, steps=40,
                                           selection={"policy": "trainable"}))
    assert summary["steps"] == 40
    losses = progress_losses(lines)
    assert losses[-1] < losses[0]
    assert ckpt_names(storage, "gpu", "serving", 40) == MLP_TRAINABLE
