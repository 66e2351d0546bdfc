"""Data-parallel training on a real local Ray: loss, replica identity,
selective checkpoints read with stock TF, resume, errors."""

import os

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.errors import ConfigError, SelectionError

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

MLP = "distributed.examples.digits:mlp_model_fn"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    yield
    ray.shutdown()


def make_config(storage, run, **kw):
    base = {"storage": storage, "run": run, "steps": 60, "log_every": 30,
            "checkpoint": {"serving_every": 30, "full_every": 60}}
    base.update(kw)
    return config_lib.from_dict(base)


def run(config):
    from distributed.train.trainer import train
    lines = []
    summary = train(config, echo=lines.append)
    return summary, lines


def ckpt_names(storage, run_name, tier, step):
    prefix = os.path.join(storage, run_name, "checkpoints", tier,
                          f"step-{step:09d}", "model.ckpt")
    return {name for name, _ in tf.train.list_variables(prefix)}, prefix


@pytest.mark.slow
def test_cnn_trains_with_inference_selection_and_resumes(local_ray, storage):
    config = make_config(storage, "cnn", steps=60)
    summary, lines = run(config)
    losses = [float(l.split("loss ")[1].split()[0]) for l in lines if l.startswith("step ")]
    assert losses[-1] < losses[0] * 0.7, lines
    names, prefix = ckpt_names(storage, "cnn", "serving", 60)
    assert "cnn/conv_0/bn/moving_mean" in names and "cnn/conv_1/bn/moving_variance" in names
    assert not any("Adam" in n or n in ("global_step", "beta1_power") for n in names)
    full, full_prefix = ckpt_names(storage, "cnn", "full", 60)
    assert {"global_step", "beta1_power", "cnn/conv_0/kernel/Adam"} <= full
    catalog = Catalog(RunLayout(storage, "cnn"))
    assert [e.step for e in catalog.entries("serving")] == [30, 60]
    assert "loss" in catalog.best("loss").metrics
    slot_before = tf.train.load_checkpoint(full_prefix).get_tensor("cnn/conv_0/kernel/Adam")

    # Resume with more steps: continues from step 60 with optimizer state.
    summary2, lines2 = run(make_config(storage, "cnn", steps=90))
    assert any("resuming run 'cnn' from its full checkpoint at step 60" in l for l in lines2)
    assert [l for l in lines2 if l.startswith("step ")][0].startswith("step 90/90")
    reader = tf.train.load_checkpoint(ckpt_names(storage, "cnn", "full", 90)[1])
    assert reader.get_tensor("global_step") == 90
    slot_after = reader.get_tensor("cnn/conv_0/kernel/Adam")
    assert not np.array_equal(slot_before, slot_after)  # trained on, from real slots
    assert summary2["steps"] == 90


@pytest.mark.slow
def test_replicas_stay_identical_including_bn_statistics(local_ray, storage):
    from distributed.train.coordinator import Coordinator
    from distributed.train.worker import Worker
    config = make_config(storage, "replicas", steps=40)
    cfg = config.to_dict()
    coord = ray.remote(Coordinator).options(num_cpus=0.25).remote(cfg)
    workers = [ray.remote(Worker).options(num_cpus=0.5).remote(cfg, r) for r in range(2)]
    try:
        plan = ray.get(coord.prepare.remote())
        addresses = ray.get([w.address.remote() for w in workers])
        ray.get([w.setup.remote(addresses) for w in workers])
        values = coord.initial_values.remote()
        ray.get([w.load.remote(values, 0) for w in workers])
        ray.get([w.train.remote(25) for w in workers])
        a, b = ray.get([w.variables.remote() for w in workers])
        assert set(a) == set(b) and "cnn/conv_0/bn/moving_mean" in a
        initial = ray.get(values)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert not np.allclose(a["cnn/conv_0/bn/moving_mean"],
                               initial["cnn/conv_0/bn/moving_mean"])
        assert int(a["global_step"]) == 25
    finally:
        for actor in workers + [coord]:
            ray.kill(actor)


def test_trainable_selection_warns_and_regexes_apply(local_ray, storage):
    config = make_config(storage, "mlp", model=MLP, steps=20, log_every=20,
                         selection={"policy": "trainable", "exclude": ["bias$"]},
                         checkpoint={"serving_every": 0, "full_every": 0})
    _, lines = run(config)
    names, _ = ckpt_names(storage, "mlp", "serving", 20)
    assert names == {"mlp/dense_0/kernel", "mlp/dense_1/kernel", "mlp/logits/kernel"}

    cnn = make_config(storage, "cnn-trainable", steps=10, log_every=10,
                      selection={"policy": "trainable"})
    _, lines = run(cnn)
    assert any(l.startswith("WARNING:") and "moving_mean" in l and "policy: inference" in l
               for l in lines)


def test_user_errors_surface_cleanly(local_ray, storage):
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        run(make_config(storage, "bad1", model="no_such_module:fn"))
    with pytest.raises(SelectionError, match="matches no variable"):
        run(make_config(storage, "bad2", model=MLP, selection={"include": ["^nothing/"]}))
    with pytest.raises(ConfigError, match="need 8 GPUs but the cluster has 0"):
        run(make_config(storage, "bad3", workers=2, gpus_per_worker=4))


def _has_gpu() -> bool:
    import shutil
    import subprocess
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
def test_one_gpu_worker_with_nccl_hint(storage):
    ray.init(ignore_reinit_error=True)
    try:
        config = make_config(storage, "gpu", model=MLP, workers=1, gpus_per_worker=1,
                             steps=50, log_every=25)
        summary, _ = run(config)
        assert summary["steps"] == 50
    finally:
        ray.shutdown()
