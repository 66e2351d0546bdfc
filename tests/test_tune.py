"""Hyperparameter search with Ray Tune (:mod:`distributed.tune`), checked with
Tune's own API on a real local Ray, with real TF and real storage.

Layers: ``param_space`` keys and checkpoint pointers without Ray; a run that
starts from another run's full checkpoint (PBT's exploit) driven by the
trainer alone; then ``ray.tune.Tuner`` searches: a bad key, a trial a
scheduler stops, and PBT. The acceptance search (4 trials of the digits CNN
under ASHA) is ``scripts/bench_tune.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.checkpoint.layout import RUN_CONFIG_FILE
from distributed.checkpoint.store import CheckpointStore
from distributed.cli.guard import main_guard
from distributed.errors import CheckpointNotFoundError, ConfigError
from distributed.tune import CheckpointPointer, read_pointer, space
from tests.conftest import REPO_ROOT
from tests.helpers.drivers import prepare, wait_for_free_cpus
from tests.helpers.training import saved_variables

NUM_CPUS = 4
MLP = "distributed.examples.digits:mlp_model_fn"


def mlp_config(storage: str, run: str, **overrides) -> dict:
    """A small, fast run: a one-layer MLP on digits, one worker, a serving and
    a full checkpoint every 10 steps (so each report can be resumed)."""
    data = {"storage": storage, "run": run, "model": MLP,
            "model_params": {"hidden": [32]}, "steps": 30, "batch_size": 32,
            "workers": 1, "cpus_per_worker": 0.5, "log_every": 10,
            "optimizer": {"name": "adam", "learning_rate": 0.01},
            "checkpoint": {"serving_every": 10, "full_every": 10},
            "retention": {"serving": {"keep_last": 10}, "full": {"keep_last": 10}},
            "collective_timeout": 60.0}
    data.update(overrides)
    return data


# ------------------------------------------------------ param_space keys -----

@pytest.mark.parametrize("key, message", [
    ("batch_sise", "param_space: batch_sise: unknown key; did you mean 'batch_size'?"),
    ("checkpoint.serving_evry", "param_space: checkpoint.serving_evry: unknown key; "
                                "did you mean 'serving_every'? valid keys under "
                                "checkpoint are serving_every, full_every, shards, on_busy"),
    ("model_params.hiden", "param_space: model_params.hiden: not a key of the config's "
                           "model_params (hidden); did you mean 'hidden'? add it to the "
                           "config (with its default) to search over it"),
    ("eval.every", "param_space: eval.every: the config has no eval block; add one"),
    ("optimizer.learning_rate.initial", "param_space: optimizer.learning_rate.initial: "
                                        "optimizer.learning_rate is 0.01 in the config, "
                                        "not a mapping with keys"),
    ("run", "param_space: run: each trial trains its own run, named after the trial"),
    ("storage", "param_space: storage: the trials of a search share one storage"),
    ("a..b", "param_space: 'a..b' is not a dotted config path"),
])
def test_bad_param_space_key_is_one_line_naming_it(storage, key, message):
    base = config_lib.from_dict(mlp_config(storage, "r"))
    with pytest.raises(ConfigError) as info:
        space.check_keys(base, [key])
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_param_space_values_replace_fields_and_are_validated(storage):
    base = mlp_config(storage, "r")
    config = space.trial_config(config_lib.from_dict(base).to_dict(), {
        "optimizer.learning_rate": 0.05, "optimizer.beta1": 0.8, "batch_size": 16,
        "model_params.hidden": [8, 8], "checkpoint": {"serving_every": 5}})
    assert config.optimizer.learning_rate == 0.05
    assert config.optimizer.kwargs == {"beta1": 0.8}  # checked against Adam's later
    assert (config.batch_size, config.model_params["hidden"]) == (16, [8, 8])
    assert (config.checkpoint.serving_every, config.checkpoint.full_every) == (5, 500)
    assert config.run == "r"
    with pytest.raises(ConfigError, match=r"^param_space: optimizer\.learning_rate: "
                                          r"expected a positive number, got -1$"):
        space.trial_config(base, {"optimizer.learning_rate": -1})


# ------------------------------------------------------------- pointers -----

def test_pointer_round_trips_and_refuses_what_is_not_one(tmp_path):
    pointer = CheckpointPointer("/data/runs", "r_1", 30, "abc_00001", "r_1", 30)
    pointer.write(str(tmp_path / "ckpt"))
    assert read_pointer(str(tmp_path / "ckpt")) == pointer
    assert pointer.resumable
    assert not CheckpointPointer("/data/runs", "r_1", 10, "abc_00001").resumable

    with pytest.raises(ConfigError, match=r"is not a Tune checkpoint of a distributed"
                                          r"\.tune trial \(it has no checkpoint_pointer"):
        read_pointer(str(tmp_path))
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "checkpoint_pointer.json").write_text(json.dumps({"schema_version": 2}))
    with pytest.raises(ConfigError, match=r"has schema_version 2; this version of the "
                                          r"project reads 1"):
        read_pointer(str(newer))


@pytest.mark.parametrize("argv, message", [
    (["--tune-checkpoint", "{tmp}", "--run", "r"],
     "--tune-checkpoint names the run (and its storage and step); drop --run"),
    (["--tune-checkpoint", "{tmp}", "--step", "3"],
     "argument --step: not allowed with argument --tune-checkpoint"),
    (["--tune-checkpoint", "{tmp}"], "is not a Tune checkpoint of a distributed.tune "
                                     "trial (it has no checkpoint_pointer.json)"),
])
def test_restore_job_refuses_a_bad_tune_checkpoint_in_one_line(tmp_path, capsys,
                                                               argv, message):
    from jobs import restore
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main_guard(lambda: restore.main(argv + ["--export", str(tmp_path / "x")]))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "x")


# ----------------------------------------- a run from another's checkpoint -----

def full_tensors(storage: str, run: str, step: int) -> dict[str, np.ndarray]:
    import tensorflow as tf
    prefix = os.path.join(RunLayout(storage, run).checkpoint_dir("full", step), "model.ckpt")
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in saved_variables(reader)}


def learning_rates(storage: str, run: str) -> set[float]:
    """The ``train/learning_rate`` values the run's TensorBoard events hold
    (the rate the workers' steps used, as rank 0 reported it)."""
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(
        os.path.join(storage, run, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {round(e.value, 7) for e in acc.Scalars("train/learning_rate")}


@pytest.mark.ray
def test_run_starts_from_another_runs_full_checkpoint_with_its_own_settings(
        local_ray, storage, tmp_path):
    """PBT's exploit without Tune: the new run's coordinator starts from the
    other run's full checkpoint: every variable, the Adam slots, the step and
    the input position."""
    from distributed.train.trainer import train
    from distributed.tune.warmstart import coordinator_from

    train(config_lib.from_dict(mlp_config(storage, "donor", steps=20)), echo=lambda _: None)
    donor = full_tensors(storage, "donor", 20)
    assert {"beta1_power", "mlp/dense_0/kernel/Adam", "global_step"} <= set(donor)
    import tensorflow as tf
    donor_position = tf.train.load_checkpoint(os.path.join(RunLayout(
        storage, "donor").checkpoint_dir("full", 20), "model.ckpt")).get_tensor(
            "input_position/worker_0").tobytes()
    assert donor_position

    exploit = config_lib.from_dict(mlp_config(
        storage, "exploit", steps=40, optimizer={"name": "adam", "learning_rate": 0.003}))
    warm = coordinator_from("donor", 20)
    coordinator = warm(exploit.to_dict())  # built in this process, as the trainer does
    try:
        plan = prepare(coordinator)
        assert (plan.opened.start_step, plan.opened.resumed_from) == (20, None)
        values = coordinator.initial_values()
        # The input goes on where the donor's stood at step 20.
        assert coordinator.input_positions() == [donor_position]
    finally:
        coordinator.sess.close()
    assert set(values) == set(donor)
    for name, value in donor.items():
        np.testing.assert_array_equal(values[name], value, err_msg=name)

    # Training on from there, the steps, Adam's clock and the new learning
    # rate: test_pbt_exploit_continues_from_another_trials_full_checkpoint.

    # What a trial reports as its Tune checkpoint, exported by jobs.restore.
    pointer_dir = str(tmp_path / "checkpoint_000001")
    CheckpointPointer(storage, "donor", 20, "t_00001", "donor", 20).write(pointer_dir)
    proc = subprocess.run([sys.executable, "-m", "jobs.restore", "--tune-checkpoint",
                           pointer_dir, "--export", str(tmp_path / "export")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exported serving checkpoint at step 20 of run 'donor'" in proc.stdout
    assert os.path.isfile(tmp_path / "export" / "20" / "saved_model.pb")

    gone = coordinator_from("donor", 15)(  # no full checkpoint at step 15
        config_lib.from_dict(mlp_config(storage, "exploit-2")).to_dict())
    try:
        with pytest.raises(CheckpointNotFoundError, match=r"the full checkpoint at step "
                           r"15 of run 'donor' is gone .*\(retention\.full\.keep_last\)"):
            prepare(gone)
    finally:
        gone.sess.close()


@pytest.mark.ray
def test_trial_places_its_coordinator_and_workers_in_their_own_bundles(local_ray):
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from distributed.tune import placement
    config = config_lib.from_dict({"workers": 2, "cpus_per_worker": 0.5})
    assert placement.bundles(config) == [{"CPU": 0.25}, {"CPU": 0.25}, {"CPU": 0.5},
                                         {"CPU": 0.5}]
    gpus = config_lib.from_dict({"workers": 2, "gpus_per_worker": 1})
    assert placement.bundles(gpus)[2:] == [{"CPU": 0.5, "GPU": 1.0}] * 2
    servers = config_lib.from_dict({"workers": 2, "cpus_per_worker": 0.5,
                                    "parameter_servers": 2, "ps_cpus": 0.25})
    assert placement.bundles(servers)[4:] == [{"CPU": 0.25}] * 2
    big = config_lib.from_dict({"parameter_servers": 1, "ps_resources": {"ps_node": 1},
                                "ps_memory": "1GiB"})
    assert placement.bundles(big)[-1] == {"CPU": 1.0, "ps_node": 1.0, "memory": 2**30}

    @ray.remote(num_cpus=0.25)
    def bundle_indexes(config):  # runs where a trial runs: bundle 0 of its group
        return ([placement.actor_options(config, rank).get("scheduling_strategy")
                 for rank in (None, 0, 1)]
                + [placement.actor_options(config, None, server=task).get(
                    "scheduling_strategy") for task in range(config.parameter_servers)])

    for config, bundles, expected in (
            (config, placement.bundles(config), [1, 2, 3]),
            (config, [{"CPU": 0.25}, {"CPU": 1.25}], [None] * 3),
            (servers, placement.bundles(servers), [1, 2, 3, 4, 5])):
        group = ray.util.placement_group(bundles)
        ray.get(group.ready(), timeout=60)
        try:
            strategies = ray.get(bundle_indexes.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, 0, placement_group_capture_child_tasks=True)).remote(config))
        finally:
            ray.util.remove_placement_group(group)
        assert [s and s.placement_group_bundle_index for s in strategies] == expected


# --------------------------------------------------------- Tune searches -----

def tuner(config: dict, tmp_path, param_space: dict, **tune_config):
    from ray import tune

    from distributed.tune import trainable
    return tune.Tuner(
        trainable(config), param_space=param_space,
        tune_config=tune.TuneConfig(**tune_config),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))


@pytest.mark.ray
def test_search_with_a_bad_param_space_key_fails_in_one_line(local_ray, storage, tmp_path):
    from ray import tune
    search = tuner(mlp_config(storage, "bad"), tmp_path,
                   {"optimizer.learnin_rate": tune.grid_search([0.01, 0.1])})
    with pytest.raises(ConfigError) as info:
        search.fit()
    assert str(info.value).startswith(
        "optimizer.learnin_rate: unknown key for adam (AdamOptimizer); did you mean "
        "'learning_rate'?")
    assert "\n" not in str(info.value)
    assert not os.listdir(storage)  # nothing started, nothing written


@pytest.mark.ray
@pytest.mark.slow
def test_trial_stopped_by_a_scheduler_leaves_no_actors_and_no_uncommitted_files(
        local_ray, storage, tmp_path):
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class StopAtFirstResult(FIFOScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            return TrialScheduler.STOP

    search = tuner(mlp_config(storage, "stopped", steps=2000, log_every=20,
                              checkpoint={"serving_every": 20, "full_every": 20}),
                   tmp_path, {"optimizer.learning_rate": 0.01},
                   scheduler=StopAtFirstResult(), metric="loss", mode="min")
    (result,) = search.fit()
    assert result.error is None
    assert result.metrics["training_iteration"] == 1
    run = result.metrics["run"]
    assert re.fullmatch(r"stopped_\w+_00000", run), run
    assert result.metrics["storage"] == storage and result.metrics["step"] == 20

    assert wait_for_free_cpus(NUM_CPUS) == NUM_CPUS  # the trial's actors are gone
    store = CheckpointStore(storage, run)
    assert store.leftovers() == []
    tmp_names = [name for _, dirs, files in os.walk(os.path.join(storage, run))
                 for name in dirs + files if ".tmp-" in name]
    assert tmp_names == []
    keys = store.catalog.committed_keys()
    assert (20, "serving") in keys and (20, "full") in keys
    assert max(step for step, _ in keys) < 2000  # stopped, its checkpoints kept
    pointer = read_pointer(result.checkpoint.path)
    assert (pointer.run, pointer.step, pointer.resume_run, pointer.resume_step) == (
        run, 20, run, 20)


@pytest.mark.ray
@pytest.mark.slow
def test_trial_with_parameter_servers_trains_and_an_exploit_restores_its_tables(
        local_ray, storage, tmp_path):
    """A trial of a run with parameter servers trains with the tables on them
    (the servers write their own shards of each checkpoint) and leaves no
    actor behind; its placement group has a bundle per server (the servers'
    Ray options place them there: the bundles test above). A run that starts
    from its full checkpoint (PBT's exploit) has its servers restore the
    trial's tables from the files, not start from their initial values."""
    from distributed.train.trainer import train
    from distributed.tune import placement
    from distributed.tune.warmstart import coordinator_from
    from tests.helpers.ps import TABLE, checkpoint_values, wide_deep_config

    def config(run, steps, rate):
        return wide_deep_config(storage, run, rows=2000, parameter_servers=2,
                                steps=steps, log_every=10,
                                optimizer={"name": "adagrad", "learning_rate": rate},
                                checkpoint={"serving_every": 10, "full_every": 10})

    search = tuner(config("ps", 20, 0.5).to_dict(), tmp_path,
                   {"optimizer.learning_rate": 0.5}, metric="loss", mode="min")
    (result,) = search.fit()
    assert result.error is None, result.error
    assert result.metrics["step"] == 20
    donor_run = result.metrics["run"]
    entries = Catalog(RunLayout(storage, donor_run)).entries()
    assert entries and all(e.num_shards >= 3 for e in entries), entries
    assert placement.bundles(config("ps", 20, 0.5))[4:] == [{"CPU": 0.5}] * 2
    assert wait_for_free_cpus(NUM_CPUS) == NUM_CPUS  # the servers are gone too

    from distributed.checkpoint.lease import leases_dir
    held = leases_dir(RunLayout(storage, donor_run))
    seen = tmp_path / "leases_when_loaded.json"

    class LeaseWatching(coordinator_from(donor_run, 20)):
        """Records the donor's reader leases when every worker has loaded."""

        def loaded(self):
            seen.write_text(json.dumps(json_files(held)))
            super().loaded()

    lines: list[str] = []
    train(config("exploit", 30, 1e-9), echo=lines.append, coordinator_cls=LeaseWatching)
    # The donor's files stay leased until rank 0 has restored the servers'
    # tables from them (its retention could delete them before), then not.
    (lease,) = json.loads(seen.read_text())
    assert lease.startswith("full.") and "20" in lease, lease
    assert json_files(held) == []
    donor = checkpoint_values(storage, donor_run, "full", 20)[TABLE]
    exploit = checkpoint_values(storage, "exploit", "full", 30)[TABLE]
    # The donor's steps moved its table (so its initial values differ too).
    earlier = checkpoint_values(storage, donor_run, "full", 10)[TABLE]
    assert np.abs(donor - earlier).max() > 1e-2
    np.testing.assert_allclose(exploit, donor, atol=1e-5, err_msg="\n".join(lines))


def json_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".json")) \
        if os.path.isdir(directory) else []


def input_failing_once(worker_index, num_workers, batch_size, params):
    """The digits, but batch ``fail_at`` raises the first time (until the
    ``marker`` file exists): a trial that errors once."""
    from distributed.examples import digits
    batches = digits.digits_input_fn(worker_index, num_workers, batch_size, {})
    for index, batch in enumerate(batches):
        if index == params["fail_at"] and not os.path.exists(params["marker"]):
            open(params["marker"], "w").close()
            raise RuntimeError("the input failed once")
        yield batch


@pytest.mark.ray
@pytest.mark.slow
def test_resumed_search_resumes_the_trials_run(local_ray, storage, tmp_path):
    from ray import tune
    config = mlp_config(storage, "resumed", steps=40, input_prefetch=0,
                        input="tests.test_tune:input_failing_once",
                        input_params={"fail_at": 25, "marker": str(tmp_path / "failed")})
    (failed,) = tuner(config, tmp_path, {}, metric="loss", mode="min").fit()
    assert "the input failed once" in str(failed.error)
    # Its last report was step 10's (step 20's evaluation-free commit came with
    # the round that failed); the run had committed step 20 before it stopped.
    run = failed.metrics["run"]
    assert failed.metrics["step"] == 10
    assert (20, "full") in Catalog(RunLayout(storage, run)).committed_keys()

    from distributed.tune import trainable
    restored = tune.Tuner.restore(os.path.dirname(failed.path),
                                  trainable=trainable(config), resume_errored=True)
    (result,) = restored.fit()
    assert result.error is None
    assert (result.metrics["run"], result.metrics["step"]) == (run, 40)
    assert result.metrics["training_iteration"] == 3  # 10, then 30 and 40
    catalog = Catalog(RunLayout(storage, run))
    assert [e.step for e in catalog.entries("serving")] == [10, 20, 30, 40]
    np.testing.assert_allclose(full_tensors(storage, run, 40)["beta1_power"], 0.9 ** 41,
                               rtol=1e-5)  # one optimizer clock: resumed at 20


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Consider boosting PBT performance")  # reuse_actors
def test_pbt_exploit_continues_from_another_trials_full_checkpoint(
        local_ray, storage, tmp_path):
    """Two trials, one with a useless learning rate: at the second report PBT
    (synchronous, so the timing is fixed) clones the good trial into the bad
    one with a perturbed learning rate."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    pbt = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=2, synch=True,
        quantile_fraction=0.5,
        hyperparam_mutations={"optimizer.learning_rate": [0.002, 0.005, 0.02]})
    search = tuner(mlp_config(storage, "pbt"), tmp_path,
                   {"optimizer.learning_rate": tune.grid_search([0.02, 1e-6])},
                   scheduler=pbt, metric="loss", mode="min")
    results = search.fit()
    assert not results.errors
    good, bad = sorted(results, key=lambda r: r.metrics["trial_id"])
    good_id = good.metrics["trial_id"]
    assert good.metrics["run"] == f"pbt_{good_id}"  # it resumed its own run
    match = re.fullmatch(rf"pbt_\w+_00001-from-{good_id}-(\d+)-[0-9a-f]{{4}}",
                         bad.metrics["run"])
    assert match, bad.metrics["run"]
    origin, run = int(match.group(1)), bad.metrics["run"]
    new_rate = bad.config["optimizer.learning_rate"]
    assert new_rate in (0.002, 0.005, 0.02)

    keys = Catalog(RunLayout(storage, run)).committed_keys()
    assert min(step for step, _ in keys) > origin  # the steps continue
    full30 = full_tensors(storage, run, 30)
    assert full30["global_step"] == 30
    np.testing.assert_allclose(full30["beta1_power"], 0.9 ** 31, rtol=1e-5)  # slots too
    assert learning_rates(storage, run) == {round(new_rate, 7)}
    with open(os.path.join(storage, run, RUN_CONFIG_FILE)) as f:
        assert json.load(f)["config"]["optimizer"]["learning_rate"] == new_rate
    assert bad.metrics["step"] == 30 and bad.metrics["loss"] < 1.0


def test_tune_digits_example_script_starts():
    """The README's runnable example imports what it needs (its search itself is
    timed by scripts/bench_tune.py)."""
    done = subprocess.run([sys.executable, os.path.join("scripts", "tune_digits.py"), "--help"],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--rates" in done.stdout
