"""Exactly-once Ray Data input: a run stopped and resumed trains on the same
batches as one trained straight through, and a resume on fewer workers
trains on the rest of the epoch once.

Real Ray, real TF: rows ``0..5999`` in order (:func:`ids_dataset`), 2
workers, batch 16; the model counts per id how often a step trained on it
(``state/seen``, :mod:`tests.helpers.position_models`), read back from the
last full checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import RunLayout
from distributed.errors import ConfigError
from distributed.train import trainer
from tests.helpers.position_models import assert_same_training

pytestmark = [pytest.mark.ray]

HELPERS = "tests.helpers.raydata_inputs"
ROWS = 6000


def make_config(storage: str, run: str, steps: int, **overrides) -> config_lib.TrainConfig:
    data = {"storage": storage, "run": run,
            "model": "tests.helpers.position_models:seen_model_fn",
            "model_params": {"ids": ROWS},
            "input": {"ray_dataset": f"{HELPERS}:ids_dataset", "label": "label"},
            "input_params": {"rows": ROWS}, "steps": steps, "batch_size": 16,
            "workers": 2, "cpus_per_worker": 0.5, "log_every": 25,
            "optimizer": {"name": "sgd", "learning_rate": 0.5},
            "checkpoint": {"serving_every": 0, "full_every": 50},
            "retention": {"full": {"keep_last": 10}}, "collective_timeout": 60.0}
    data.update(overrides)
    return config_lib.from_dict(data)


def final_state(storage: str, run: str, step: int) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(os.path.join(
        RunLayout(storage, run).checkpoint_dir("full", step), "model.ckpt"))
    return {name: reader.get_tensor(name) for name in ("state/seen", "w")}


STEPS = 250


@pytest.fixture(scope="module")
def straight(local_ray, tmp_path_factory) -> dict[str, np.ndarray]:
    """The final state of a run trained straight through, five steps per
    ``Session.run`` (a loop of steps takes the same batches as single steps,
    so the tests below compare both with it)."""
    storage = str(tmp_path_factory.mktemp("straight"))
    trainer.train(make_config(storage, "straight", STEPS, steps_per_run=5),
                  echo=lambda _: None)
    state = final_state(storage, "straight", STEPS)
    assert state["state/seen"].sum() == STEPS * 2 * 16
    return state


def test_stopped_and_resumed_trains_on_the_same_batches(straight, tmp_path):
    # Five steps per run (one: the worker-killed test below). Stopped at step
    # 150, each worker is 352 rows into its third chunk of 1,024 rows; worker
    # 1's chunk spans the end of epoch 0, so the resume reads epoch 0 again
    # for the rest of both chunks, then goes on in epoch 1.
    storage = str(tmp_path)
    trainer.train(make_config(storage, "resumed", 150, steps_per_run=5),
                  echo=lambda _: None)
    lines: list[str] = []
    trainer.train(make_config(storage, "resumed", STEPS, steps_per_run=5),
                  echo=lines.append)
    assert any("the Ray Data input resumes at epoch 1 from row 144; first the "
               "untrained rest of 2 chunk(s) (1344 rows), dealt over 2 worker(s)" in line
               for line in lines), [l for l in lines if "Ray Data" in l]
    assert_same_training(straight, final_state(storage, "resumed", STEPS))


def test_resumed_on_one_worker_trains_on_the_rest_of_the_epoch_once(local_ray, tmp_path):
    # 2 workers to step 100 (3,200 rows: each 576 rows into its second chunk),
    # then 1 worker: the rest of both chunks (896 rows), then rows 4,096 to
    # 5,999: 175 steps end the epoch exactly, every row trained on once.
    storage = str(tmp_path)
    trainer.train(make_config(storage, "resized", 100), echo=lambda _: None)
    lines: list[str] = []
    trainer.train(make_config(storage, "resized", 275, workers=1), echo=lines.append)
    assert any("the Ray Data input resumes at epoch 0 from row 4096; first the "
               "untrained rest of 2 chunk(s) (896 rows), dealt over 1 worker(s)" in line
               for line in lines), lines
    seen = final_state(storage, "resized", 275)["state/seen"]
    np.testing.assert_array_equal(seen, np.ones(ROWS, np.float32))


def test_unseeded_shuffle_is_refused_under_exact(local_ray, tmp_path):
    config = make_config(str(tmp_path), "shuffled", 10,
                         input_params={"rows": ROWS, "shuffle": True})
    with pytest.raises(ConfigError, match=r"^input_position: the dataset of "
                       r"tests\.helpers\.raydata_inputs:ids_dataset calls "
                       r"random_shuffle\(\) without a seed"):
        trainer.train(config, echo=lambda _: None)
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_worker_killed_after_a_full_checkpoint_trains_on_the_same_batches(
        straight, tmp_path, own_workers):
    """SIGKILL to a worker after the first full checkpoint: the new group's
    feeder deals from that checkpoint's plan, and the run ends as one that
    never failed."""
    import random

    from tests.helpers.fault_actors import Killer
    storage = str(tmp_path)
    killers: list[Killer] = []

    def echo(line):
        if not killers and "committed full checkpoint at step 50" in line:
            killers.append(Killer(storage, random.Random(5)))

    summary = trainer.train(make_config(storage, "killed", STEPS, max_failures=2),
                            echo=echo)
    killers[0].check()
    assert len(summary["failures"]) == 1, summary["failures"]
    assert_same_training(straight, final_state(storage, "killed", STEPS))
