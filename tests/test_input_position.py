"""Exactly-once input: a run stopped and resumed, or restarted after a worker
was killed, trains on the same examples as one trained straight through.

Real Ray, real TF: 2 workers, batch 16, ids 0..2047
(:mod:`tests.helpers.position_models`); the per-id counts ``state/seen`` and
the weights of the last full checkpoint are compared with stock TensorFlow.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import RunLayout
from distributed.errors import ConfigError
from distributed.train import trainer
from tests.conftest import start_local_ray

pytestmark = [pytest.mark.ray]

MODELS = "tests.helpers.position_models"
STEPS, FULL_EVERY = 200, 50


@pytest.fixture(scope="module")
def local_ray():
    with start_local_ray(4, log_to_driver=False):
        yield


def make_config(storage: str, run: str, **overrides) -> config_lib.TrainConfig:
    data = {"storage": storage, "run": run, "model": f"{MODELS}:seen_model_fn",
            "input": f"{MODELS}:dataset_input_fn", "steps": STEPS, "batch_size": 16,
            "workers": 2, "cpus_per_worker": 0.5, "log_every": 25,
            "optimizer": {"name": "sgd", "learning_rate": 0.5},
            "checkpoint": {"serving_every": 100, "full_every": FULL_EVERY},
            "retention": {"full": {"keep_last": 10}}, "collective_timeout": 60.0,
            "max_failures": 2}
    data.update(overrides)
    return config_lib.from_dict(data)


def final_state(storage: str, run: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(os.path.join(
        RunLayout(storage, run).checkpoint_dir("full", STEPS), "model.ckpt"))
    return {name: reader.get_tensor(name) for name in ("state/seen", "w")}


def straight_and_resumed(tmp_path, **overrides):
    """The final state of a run straight through and of one stopped at step
    100 and resumed (the same config otherwise)."""
    storage = str(tmp_path / "storage")
    trainer.train(make_config(storage, "straight", **overrides), echo=lambda _: None)
    trainer.train(make_config(storage, "resumed", **{**overrides, "steps": 100}),
                  echo=lambda _: None)
    lines: list[str] = []
    trainer.train(make_config(storage, "resumed", **overrides), echo=lines.append)
    assert any("resuming run 'resumed' from its full checkpoint at step 100" in line
               for line in lines), lines
    return final_state(storage, "straight"), final_state(storage, "resumed")


def assert_same_training(a, b):
    assert a["state/seen"].sum() == STEPS * 2 * 16
    np.testing.assert_array_equal(a["state/seen"], b["state/seen"])
    np.testing.assert_allclose(a["w"], b["w"], atol=1e-4)


def test_tf_data_stopped_and_resumed_trains_on_the_same_examples(local_ray, tmp_path):
    assert_same_training(*straight_and_resumed(tmp_path))


def test_input_position_restart_trains_on_other_examples(local_ray, tmp_path):
    """The old behaviour, on request: the resumed run reads its input from the
    beginning again, so the counts differ (and the acceptance check can fail)."""
    straight, resumed = straight_and_resumed(tmp_path, input_position="restart")
    assert straight["state/seen"].sum() == resumed["state/seen"].sum()
    assert not np.array_equal(straight["state/seen"], resumed["state/seen"])


@pytest.mark.slow
def test_tf_data_with_steps_per_run_resumes_at_the_checkpoint_step(local_ray, tmp_path):
    assert_same_training(*straight_and_resumed(tmp_path, steps_per_run=5))


@pytest.mark.slow
@pytest.mark.parametrize("input_fn", ["generator_input_fn", "resumable_input_fn"])
def test_python_generator_resumes_after_its_consumed_batches(local_ray, tmp_path,
                                                             input_fn):
    """A plain generator replays the consumed batches; one that takes
    ``start_batch`` starts there. Both train on the same examples."""
    assert_same_training(*straight_and_resumed(tmp_path, input=f"{MODELS}:{input_fn}"))


def test_from_generator_is_refused_with_exact_and_accepted_with_restart(local_ray,
                                                                         tmp_path):
    storage = str(tmp_path / "storage")
    overrides = {"input": f"{MODELS}:generator_dataset_input_fn", "steps": 10,
                 "checkpoint": {"serving_every": 10, "full_every": 10}}
    with pytest.raises(ConfigError) as caught:
        trainer.train(make_config(storage, "exact", **overrides), echo=lambda _: None)
    message = str(caught.value)
    assert "\n" not in message
    assert "PyFunc" in message and "input_position: restart" in message, message
    summary = trainer.train(make_config(storage, "restart", input_position="restart",
                                        **overrides), echo=lambda _: None)
    assert summary["steps"] == 10


def test_full_checkpoints_hold_every_workers_position_serving_ones_none(local_ray,
                                                                       tmp_path):
    storage = str(tmp_path / "storage")
    trainer.train(make_config(storage, "sizes", steps=50), echo=lambda _: None)
    layout = RunLayout(storage, "sizes")
    full = tf.train.load_checkpoint(os.path.join(layout.checkpoint_dir("full", 50),
                                                 "model.ckpt"))
    sizes = {name: shape for name, shape in full.get_variable_to_shape_map().items()
             if name.startswith("input_position/")}
    assert sorted(sizes) == ["input_position/worker_0", "input_position/worker_1"]
    assert all(shape[0] > 0 for shape in sizes.values()), sizes
    serving = tf.train.load_checkpoint(os.path.join(
        layout.checkpoint_dir("serving", 50), "model.ckpt"))
    assert not any(n.startswith("input_position/")
                   for n in serving.get_variable_to_shape_map())


@pytest.mark.slow
def test_tf_data_worker_killed_after_a_full_checkpoint_trains_on_the_same_examples(
        local_ray, tmp_path, monkeypatch):
    """SIGKILL to a worker after the first full checkpoint: the group restarts
    from a full checkpoint with every worker's iterator state."""
    from distributed.train import worker as worker_module
    from tests.helpers.fault_actors import PidRecordingWorker
    from tests.test_faults import Killer
    monkeypatch.setattr(worker_module, "Worker", PidRecordingWorker)
    storage = str(tmp_path / "storage")
    lines, killers = [], []

    def echo(line):
        lines.append(line)
        if not killers and f"committed full checkpoint at step {FULL_EVERY}" in line:
            killers.append(Killer(storage, random.Random(3)))

    summary = trainer.train(make_config(storage, "killed"), echo=echo)
    killers[0].check()
    assert len(summary["failures"]) == 1, "\n".join(lines)
    monkeypatch.undo()
    trainer.train(make_config(storage, "straight"), echo=lambda _: None)
    assert_same_training(final_state(storage, "straight"), final_state(storage, "killed"))


def test_input_position_names_its_choices():
    with pytest.raises(ConfigError, match="exact.*restart"):
        config_lib.from_dict({"input_position": "resume"})
    assert config_lib.from_dict({}).input_position == "exact"
