"""Exactly-once input: a run stopped and resumed, or restarted after a worker
or the coordinator was killed (the coordinator mid-save), with one or several
steps per ``Session.run``, trains on the same examples as one trained straight
through: the cases of the acceptance check through the CLI
(``scripts/check_input_position.py``), in-process.

Real Ray, real TF: 2 workers, batch 16, ids 0..2047
(:mod:`tests.helpers.position_models`); the per-id counts ``state/seen`` and
the weights of the last full checkpoint are compared with stock TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.checkpoint.layout import TMP_MARKER
from distributed.errors import ConfigError
from distributed.train import trainer
from tests.conftest import REPO_ROOT
from tests.helpers import position_models

pytestmark = [pytest.mark.ray]

MODELS = "tests.helpers.position_models"
STEPS, FULL_EVERY = 200, 50


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


def straight_and_resumed(tmp_path, straight=None, **overrides):
    """The final state of a run straight through (``straight``, when given)
    and of one stopped at step 100 and resumed (the same config otherwise)."""
    storage = str(tmp_path / "storage")
    if straight is None:
        trainer.train(make_config(storage, "straight", **overrides), echo=lambda _: None)
    trainer.train(make_config(storage, "resumed", **{**overrides, "steps": 100}),
                  echo=lambda _: None)
    lines: list[str] = []
    trainer.train(make_config(storage, "resumed", **overrides), echo=lines.append)
    assert any("resuming run 'resumed' from its full checkpoint at step 100" in line
               for line in lines), lines
    return (straight if straight is not None else final_state(storage, "straight"),
            final_state(storage, "resumed"))


def assert_same_training(a, b):
    assert a["state/seen"].sum() == STEPS * 2 * 16
    position_models.assert_same_training(a, b)


def test_tf_data_stopped_and_resumed_trains_on_the_same_examples(straight_state,
                                                                tmp_path):
    assert_same_training(*straight_and_resumed(tmp_path, straight_state))


def test_input_position_restart_trains_on_other_examples(straight_state, tmp_path):
    """The old behaviour, on request: the resumed run reads its input from the
    beginning again, so the counts differ from the run straight through (and
    the acceptance check can fail)."""
    straight, resumed = straight_and_resumed(tmp_path, straight_state,
                                             input_position="restart")
    assert straight["state/seen"].sum() == resumed["state/seen"].sum()
    assert not np.array_equal(straight["state/seen"], resumed["state/seen"])


@pytest.mark.slow
def test_tf_data_with_steps_per_run_resumes_at_the_checkpoint_step(straight_state,
                                                                    tmp_path):
    """Five steps per ``Session.run``, stopped and resumed, end as one step a
    run trained straight through (the loop trains exactly as single steps)."""
    assert_same_training(*straight_and_resumed(tmp_path, straight_state,
                                               steps_per_run=5))


@pytest.mark.slow
@pytest.mark.parametrize("input_fn", ["generator_input_fn", "resumable_input_fn"])
def test_python_generator_resumes_after_its_consumed_batches(generator_straight_state,
                                                             tmp_path, input_fn):
    """A plain generator replays the consumed batches; one that takes
    ``start_batch`` starts there. Both train on the same examples as the plain
    generator straight through (the same batches)."""
    assert_same_training(*straight_and_resumed(tmp_path, generator_straight_state,
                                               input=f"{MODELS}:{input_fn}"))


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


def test_input_position_names_its_choices():
    with pytest.raises(ConfigError, match="exact.*restart"):
        config_lib.from_dict({"input_position": "resume"})
    assert config_lib.from_dict({}).input_position == "exact"


# -- the coordinator dies mid-save, steps_per_run with a generator, a worker killed

@pytest.fixture(scope="module")
def straight_state(local_ray, tmp_path_factory):
    """The final state of the default config trained straight through (once
    for the tests below that compare with it)."""
    storage = str(tmp_path_factory.mktemp("straight") / "storage")
    trainer.train(make_config(storage, "straight"), echo=lambda _: None)
    return final_state(storage, "straight")


@pytest.fixture(scope="module")
def generator_straight_state(local_ray, tmp_path_factory):
    """The final state of the plain Python generator's run straight through."""
    storage = str(tmp_path_factory.mktemp("generator-straight") / "storage")
    trainer.train(make_config(storage, "straight", input=f"{MODELS}:generator_input_fn"),
                  echo=lambda _: None)
    return final_state(storage, "straight")


def _own_processes(title: str) -> list[int]:
    """Live processes of this test's own local Ray (descendants of this
    process, never another Ray's on the machine) whose title starts with
    ``title``."""
    import psutil
    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if (child.cmdline()[:1] or [""])[0].startswith(title):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def _assert_restarted_from_a_full_checkpoint(storage, run, summary, lines,
                                             step=None):
    """One failure, of the coordinator; the new group resumed from a full
    checkpoint (``step``, where given), redid the steps after it, and
    committed the checkpoint that was being written; nothing partial is left."""
    text = "\n".join(lines)
    assert summary["steps"] == STEPS and len(summary["failures"]) == 1, text
    assert "coordinator" in summary["failures"][0], summary["failures"]
    resumed = re.search(r"restarted: resuming from the full checkpoint at step (\d+); "
                        r"steps (\d+)\.\.\d+ are redone", text)
    assert resumed, text
    assert int(resumed.group(2)) == int(resumed.group(1)) + 1, text
    assert int(resumed.group(1)) == step if step else \
        int(resumed.group(1)) % FULL_EVERY == 0, text
    layout = RunLayout(storage, run)
    full = [e.step for e in Catalog(layout).entries("full")]
    assert full == list(range(FULL_EVERY, STEPS + 1, FULL_EVERY)), (full, text)
    assert not [n for _, dirs, files in os.walk(layout.root) for n in dirs + files
                if TMP_MARKER in n], "a partial checkpoint was left behind"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["renamed"])  # test_faults tries every phase
def test_coordinator_dying_mid_save_restarts_from_the_previous_full_checkpoint(
        straight_state, tmp_path, phase):
    """The coordinator's process dies (``os._exit``) while it writes the full
    checkpoint of step 100: after its tensors are written, or after the
    directory is renamed into place but before the catalog row commits it.
    The group restarts from step 50's full checkpoint and its input positions,
    and ends with the counts and weights of a run trained straight through."""
    from tests.helpers.fault_actors import CrashingCoordinator
    storage = str(tmp_path / "storage")
    os.makedirs(storage)
    plan = os.path.join(storage, "crash_plan.json")
    with open(plan, "w") as f:
        json.dump([], f)  # armed once step 50 is committed: the next full save dies
    lines = []

    def echo(line):
        lines.append(line)
        if f"committed full checkpoint at step {FULL_EVERY}" in line and \
                not any("FAILURE" in ln for ln in lines):
            with open(plan + ".tmp", "w") as f:
                json.dump([phase], f)
            os.replace(plan + ".tmp", plan)

    config = make_config(storage, "coord", checkpoint={"serving_every": 0,
                                                       "full_every": FULL_EVERY})
    summary = trainer.train(config, echo=echo, coordinator_cls=CrashingCoordinator)
    with open(plan) as f:
        assert json.load(f) == [], "the coordinator never reached the phase"
    # Step 100's save, unless the commit of 50 was reported only after it began
    # (a loaded machine): then a later one; either way from a full checkpoint.
    _assert_restarted_from_a_full_checkpoint(storage, "coord", summary, lines)
    assert_same_training(straight_state, final_state(storage, "coord"))


@pytest.mark.slow
def test_coordinator_sigkilled_during_a_full_save_restarts_exactly(straight_state,
                                                                  tmp_path):
    """SIGKILL to the coordinator's process while it is saving the full
    checkpoint of step 100 (a slow storage holds the save open): the same
    outcome as above, from outside the process."""
    from tests.helpers.fault_actors import SlowSavingCoordinator
    storage = str(tmp_path / "storage")
    os.makedirs(storage)
    slow = os.path.join(storage, "slow_saves.json")
    with open(slow, "w") as f:
        json.dump({str(2 * FULL_EVERY): 60}, f)
    lines, killed = [], []

    def echo(line):
        lines.append(line)
        # Step 125's round: step 100's save was handed over 25 steps ago and
        # sleeps for a minute before it writes.
        if not killed and line.startswith(f"step {2 * FULL_EVERY + 25}/"):
            victims = _own_processes("ray::SlowSavingCoordinator")
            assert len(victims) == 1, victims
            with open(slow, "w") as f:
                json.dump({}, f)  # the restarted coordinator saves at full speed
            os.kill(victims[0], signal.SIGKILL)
            killed.append(victims[0])

    config = make_config(storage, "coord-kill", checkpoint={"serving_every": 0,
                                                            "full_every": FULL_EVERY})
    summary = trainer.train(config, echo=echo, coordinator_cls=SlowSavingCoordinator)
    assert killed, "\n".join(lines)
    _assert_restarted_from_a_full_checkpoint(storage, "coord-kill", summary, lines,
                                             step=FULL_EVERY)
    assert_same_training(straight_state, final_state(storage, "coord-kill"))


@pytest.mark.slow
def test_python_generator_with_steps_per_run_resumes_at_the_checkpoint_step(
        generator_straight_state, tmp_path):
    """Three steps per ``Session.run`` (not a divisor of the checkpoint
    interval): the position counts the batches the steps took, not those the
    stacked feed or the reader thread read ahead."""
    assert_same_training(*straight_and_resumed(
        tmp_path, generator_straight_state, input=f"{MODELS}:generator_input_fn",
        steps_per_run=3))


@pytest.mark.slow
def test_worker_sigkilled_mid_run_trains_on_the_same_examples(straight_state, tmp_path,
                                                              own_workers):
    """SIGKILL to a worker's process from outside, at a random moment after
    the first full checkpoint: the group restarts from a full checkpoint with
    its input positions and ends with the counts and weights of the run
    trained straight through (``scripts/check_input_position.py``'s
    ``sigkill`` case, in-process)."""
    import random

    from tests.helpers.fault_actors import Killer
    storage = str(tmp_path / "storage")
    lines: list[str] = []
    killers: list[Killer] = []

    def echo(line):
        lines.append(line)
        if not killers and f"committed full checkpoint at step {FULL_EVERY}" in line:
            killers.append(Killer(storage, random.Random(5)))

    summary = trainer.train(make_config(storage, "killed"), echo=echo)
    killers[0].check()
    text = "\n".join(lines)
    assert len(summary["failures"]) == 1 and "died" in summary["failures"][0], text
    assert re.search(r"restarted: resuming from the full checkpoint at step \d+", text), text
    assert_same_training(straight_state, final_state(storage, "killed"))


def test_cli_acceptance_check_names_its_cases():
    """The acceptance script itself (its runs are the tests above, in-process)."""
    out = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "check_input_position.py"),
         "--cases", "sigkill,nothing"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--cases: expected some of tfdata,sigkill,generator,resumable,control" \
        in out.stderr, out.stderr
