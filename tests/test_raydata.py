"""Ray Data input (``input: {ray_dataset: fn, label: COLUMN}``) end to end.

On a real local Ray: Parquet files the test writes, read by
``ray.data.read_parquet`` (streamed, and materialized), train the digits models
to a low loss and commit checkpoints as usual, and the run's record lets the
restore job export a SavedModel whose signature takes the Parquet column.
Bad Ray Data inputs are each one readable line and write nothing.

On a multi-node Ray simulated on this machine (``ray.cluster_utils.Cluster``,
token authentication on): the two workers land on different nodes, a node
holding one is removed after the first full checkpoint, and the run finishes
on a replacement node, resumed from the last full checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import ray
import tensorflow as tf

import jobs.train
from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.checkpoint.verify import verify_checkpoint
from distributed.cli.guard import main_guard
from distributed.errors import ConfigError, DistributedError
from distributed.examples import digits
from distributed.examples.digits_inputs import write_digits_parquet
from distributed.serving import job
from tests.helpers.ray_cluster import simulated_cluster
from distributed.train import trainer
from tests.conftest import REPO_ROOT, start_local_ray
from tests.helpers import raydata_inputs
from tests.helpers.drivers import wait_for_free_cpus
from tests.helpers.training import (CNN, CNN_BN_STATS, CNN_TRAINABLE, MLP,
                                    MLP_TRAINABLE, ckpt_prefix, progress_losses,
                                    serving_accuracy)

pytestmark = pytest.mark.ray

NUM_CPUS = 4
# Ray Data (2.60) reads Parquet footers with a pool of actors per listing, 32 by
# default: 32 Python processes per epoch of a streamed read_parquet, a long
# wait on a 2-core machine. Two are plenty for four small files; the actors
# and workers inherit this from the environment the Ray processes start in.
FOOTER_ACTORS = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}
PARQUET = "tests.helpers.raydata_inputs:parquet_dataset"
DIGITS_SPEC = {"features": {"image": ["float32", [64]]}, "labels": ["int64", []]}


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory) -> str:
    """The digits' train split as 4 Parquet files: ``image`` (a fixed-length
    list of 64 float32) and ``label`` (int64)."""
    path = str(tmp_path_factory.mktemp("parquet") / "digits-train")
    write_digits_parquet(path, "train", files=4)
    return path


@pytest.fixture(scope="module")
def test_split_parquet(tmp_path_factory) -> str:
    """The digits' held-out split (297 rows) as one Parquet file."""
    path = str(tmp_path_factory.mktemp("parquet") / "digits-test")
    write_digits_parquet(path, "test", files=1)
    return path


def make_config(storage: str, run: str, dataset: str = PARQUET, label: str = "label",
                params: dict | None = None, **overrides) -> config_lib.TrainConfig:
    data = {"storage": storage, "run": run, "model": MLP,
            "input": {"ray_dataset": dataset, "label": label},
            "input_params": params or {},
            "steps": 40, "batch_size": 32, "workers": 2, "cpus_per_worker": 0.5,
            "log_every": 20, "optimizer": {"name": "adam", "learning_rate": 0.01},
            "checkpoint": {"serving_every": 20, "full_every": 20},
            "retention": {"serving": {"keep_last": 10}, "full": {"keep_last": 10}},
            "collective_timeout": 60.0, "max_failures": 0}
    data.update(overrides)
    return config_lib.from_dict(data)


def committed_and_sound(storage: str, run: str) -> list[tuple[str, int]]:
    """Every committed checkpoint verifies (CRC-32C of every tensor against its
    manifest); returns the committed (tier, step) keys in order."""
    layout = RunLayout(storage, run)
    keys = []
    for entry in Catalog(layout).entries():
        verify_checkpoint(os.path.join(layout.root, entry.path))
        keys.append((entry.tier, entry.step))
    return sorted(keys)


# ------------------------------------------------------ one local Ray -----

class TestOnLocalRay:
    """One local Ray for these tests (class-scoped: the multi-node test below
    needs this process without a Ray)."""

    @pytest.fixture(scope="class")
    def local_ray(self):
        with environment(FOOTER_ACTORS), start_local_ray(NUM_CPUS, log_to_driver=False):
            yield

    @pytest.mark.parametrize("materialize,model,steps", [(False, MLP, 60),
                                                         (True, CNN, 80)],
                             ids=["read_parquet-mlp", "materialized-cnn"])
    def test_parquet_trains_commits_and_exports(self, local_ray, storage, tmp_path,
                                                digits_parquet, test_split_parquet,
                                                materialize, model, steps):
        run = "rd"
        # The materialized case is evaluated on the held-out split, also Ray Data.
        # Its batches reach the workers in the order their splits ask for Ray
        # Data's blocks, which varies from run to run: its held-out accuracy at
        # step 60 ranged 0.80-0.94 (one CI run 0.798), at step 80 0.92-0.93.
        evaluation = {"eval": {"input": {"ray_dataset": PARQUET, "label": "label"},
                               "input_params": {"path": test_split_parquet,
                                                "materialize": True}}}
        config = make_config(storage, run, model=model, steps=steps,
                             params={"path": digits_parquet, "materialize": materialize},
                             **(evaluation if materialize else {}))
        lines: list[str] = []
        summary = trainer.train(config, echo=lines.append)
        text = "\n".join(lines)

        # Steps of 2 x 32 rows: the 1797 digits' epoch ends at step 28, so each
        # worker's split starts a second and a third epoch.
        assert summary["steps"] == steps and summary["failures"] == [], text
        losses = progress_losses(lines)
        assert len(losses) == steps // 20, text
        assert losses[-1] < 0.5 and losses[-1] < 0.5 * losses[0], text
        assert not [line for line in lines if line.startswith("WARNING")], text

        # Committed as usual: catalog rows for every checkpoint step, each verifies.
        every = list(range(20, steps + 1, 20))
        assert committed_and_sound(storage, run) == [
            *(("full", s) for s in every), *(("serving", s) for s in every)], text
        catalog = Catalog(RunLayout(storage, run))
        assert all(np.isfinite(e.metrics["loss"]) for e in catalog.entries())
        if materialize:  # evaluated on the 297 rows (the newest one always is)
            scored = [e.metrics.get("eval/accuracy") for e in catalog.entries("serving")]
            assert scored[-1] is not None and scored[-1] > 0.8, scored

        # Stock TF reads them; the serving checkpoint restores into the predict graph.
        serving = tf.train.load_checkpoint(ckpt_prefix(storage, run, "serving", steps))
        names = set(serving.get_variable_to_shape_map())
        assert names == (MLP_TRAINABLE if model == MLP else CNN_TRAINABLE | CNN_BN_STATS)
        full = tf.train.load_checkpoint(ckpt_prefix(storage, run, "full", steps))
        assert full.get_tensor("global_step") == steps
        accuracy, predict_vars = serving_accuracy(model, ckpt_prefix(storage, run,
                                                                     "serving", steps))
        assert predict_vars == names and accuracy > 0.8

        # The run's record has the spec the Parquet columns gave the workers,
        # so the restore job builds the serving signature from it.
        with open(os.path.join(storage, run, "run_config.json")) as f:
            record = json.load(f)
        assert record["input_spec"] == DIGITS_SPEC
        assert record["config"]["input"] == {"ray_dataset": PARQUET, "label": "label"}

        export = str(tmp_path / "export")
        result = job.restore_once(storage, run, export, echo=lambda s: None)
        assert result.step == steps
        serving_fn = tf.saved_model.load(result.export_dir).signatures["serving_default"]
        args, inputs = serving_fn.structured_input_signature
        assert args == () and set(inputs) == {"image"}, inputs
        assert inputs["image"].dtype == tf.float32
        assert inputs["image"].shape.as_list() == [None, 64]
        images, labels = digits.digits_eval_arrays("test")
        served = serving_fn(image=tf.constant(images["image"]))["classes"].numpy()
        assert np.mean(served == labels) > 0.8

    def test_ray_data_eval_reads_the_whole_split_as_the_generator_does(
            self, local_ray, storage, test_split_parquet):
        """One evaluation over a Ray Data eval input (materialized or streamed)
        reads every row, in batches of eval.batch_size, the last one partial:
        its metrics equal those of the generator eval input over the same split."""
        from distributed.train.evaluation import Evaluator
        generator = config_lib.from_dict({
            "model": MLP, "storage": storage, "batch_size": 64,
            "eval": {"input": "distributed.examples.digits:digits_eval_input_fn"}})
        want, batches = Evaluator(generator, []).evaluate({})
        assert batches == 5  # 297 rows: four of 64, one of 41
        for materialize in (True, False):
            config = config_lib.from_dict({
                "model": MLP, "storage": storage, "batch_size": 64,
                "input": {"ray_dataset": PARQUET, "label": "label"},
                "input_params": {"path": test_split_parquet, "materialize": materialize},
                "eval": {"input": {"ray_dataset": PARQUET, "label": "label"}}})
            got, n = Evaluator(config, []).evaluate({})
            assert n == batches
            assert got == pytest.approx(want, rel=1e-6), materialize
            assert set(got) == {"eval/loss", "eval/accuracy"}

    # ------------------------------------------------------- bad input -----

    @pytest.mark.parametrize("dataset,label,data,pattern", [
        (PARQUET, "lable", "digits",
         r"^input\.label: the dataset of tests\.helpers\.raydata_inputs:parquet_dataset "
         r"has no column 'lable' \(did you mean 'label'\?\); its columns are image, "
         r"label$"),
        ("tests.helpers.raydata_inputs:empty_dataset", "label", None,
         r"^input\.ray_dataset: tests\.helpers\.raydata_inputs:empty_dataset returned "
         r"an empty dataset \(no rows, no columns\); check the path"),
        (PARQUET, "label", "zero-rows",
         r"^input\.ray_dataset: the dataset of tests\.helpers\.raydata_inputs:"
         r"parquet_dataset has no rows; check the path or query it reads$"),
        (PARQUET, "label", "zero-rows-materialized",
         r"^input\.ray_dataset: tests\.helpers\.raydata_inputs:parquet_dataset "
         r"returned an empty dataset"),
        ("tests.helpers.raydata_inputs:rows_as_list", "label", None,
         r"^input\.ray_dataset: tests\.helpers\.raydata_inputs:rows_as_list returned "
         r"list, not a ray\.data\.Dataset; return e\.g\. ray\.data\.read_parquet\(path\)$"),
        (PARQUET, "label", "ragged",
         r"^input\.ray_dataset: column 'image' of "
         r"tests\.helpers\.raydata_inputs:parquet_dataset's dataset holds lists of "
         r"different lengths; pad them to one length"),
    ], ids=["label-not-a-column", "empty-dataset", "zero-row-parquet",
            "zero-row-parquet-materialized", "not-a-dataset", "ragged-list-column"])
    def test_bad_ray_data_input_is_one_line_and_writes_nothing(
            self, local_ray, storage, tmp_path, digits_parquet, dataset, label, data,
            pattern):
        params = {}
        if data == "digits":
            params = {"path": digits_parquet}
        elif data and data.startswith("zero-rows"):
            params = {"path": raydata_inputs.write_zero_row_parquet(str(tmp_path / "z")),
                      "materialize": data.endswith("materialized")}
        elif data == "ragged":
            params = {"path": raydata_inputs.write_ragged_parquet(str(tmp_path / "r"))}
        # One worker: the errors found in a worker's first batch need only one
        # actor to start.
        config = make_config(storage, "bad", dataset=dataset, label=label,
                             params=params, steps=10, log_every=5, workers=1)

        with pytest.raises(DistributedError) as info:
            trainer.train(config, echo=lambda line: None)

        error = info.value
        assert isinstance(error, ConfigError), repr(error)
        assert not isinstance(error, ray.exceptions.RayError), repr(error)
        message = str(error)
        assert "\n" not in message, message
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
        # Nothing written: not even the run's directory.
        assert not os.path.exists(os.path.join(storage, "bad"))
        assert os.listdir(storage) == []
        assert wait_for_free_cpus(NUM_CPUS) == NUM_CPUS  # the trainer killed its actors

    def test_missing_label_column_from_the_command_line_is_one_error_line(
            self, local_ray, storage, tmp_path, digits_parquet, capsys):
        """``python -m jobs.train`` as the user runs it (in-process): exit 2 and
        one ``error:`` line naming the column and listing the dataset's."""
        cfg = tmp_path / "raydata.yaml"
        cfg.write_text(
            f"model: {MLP}\n"
            f"input: {{ray_dataset: '{PARQUET}', label: labels}}\n"
            f"input_params: {{path: '{digits_parquet}'}}\n"
            "steps: 10\nbatch_size: 16\nworkers: 2\ncpus_per_worker: 0.5\n")
        code = main_guard(lambda: jobs.train.main(
            ["--config", str(cfg), "--storage", storage, "--run", "bad-cli"]))
        out, err = capsys.readouterr()
        assert code == 2, (code, out, err)
        assert out == "", out
        assert err.count("\n") == 1, err
        assert re.fullmatch(
            r"error: input\.label: the dataset of "
            r"tests\.helpers\.raydata_inputs:parquet_dataset "
            r"has no column 'labels' \(did you mean 'label'\?\); its columns are "
            r"image, label\n", err), err
        assert os.listdir(storage) == []


@contextlib.contextmanager
def environment(values: dict):
    """``os.environ`` updated with ``values``, restored on exit."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------- a multi-node cluster -----

def connects_without_token(address: str) -> tuple[bool, str]:
    """Whether a fresh process with no token (and no ~/.ray/auth_token) can
    join the cluster."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                        "RAY_ADDRESS")}
    env["HOME"] = os.path.join(REPO_ROOT, ".no-such-home-for-ray-auth")
    code = (f"import ray\nray.init(address={address!r})\nprint('JOINED')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode == 0 and "JOINED" in proc.stdout, proc.stderr[-2000:]


class NodeLoss:
    """Removes, from a thread at a random moment, the node where rank 0 of the
    current group runs; :meth:`replace` (on the main thread: starting a node
    registers signal handlers) joins that thread, re-raises whatever failed in
    it, and adds a replacement node."""

    def __init__(self, cluster, storage: str, rng: random.Random):
        self.cluster = cluster
        self.removed: str | None = None
        self.added: str | None = None
        self._error: BaseException | None = None

        def lose():
            try:
                time.sleep(rng.uniform(0.05, 0.3))
                placed = raydata_inputs.read_worker_nodes(storage)
                victim = [r for r in placed if r["rank"] == 0][-1]["node_id"]
                node = next(n for n in cluster.worker_nodes if n.node_id == victim)
                cluster.remove_node(node)
                self.removed = victim
            except BaseException as e:  # noqa: BLE001 - re-raised by replace()
                self._error = e

        self._thread = threading.Thread(target=lose, daemon=True)
        self._thread.start()

    def replace(self, num_cpus: float) -> None:
        self._thread.join(120)
        assert not self._thread.is_alive(), "removing the node hung"
        if self._error is not None:
            raise self._error
        if self.added is None:
            self.added = self.cluster.add_node(num_cpus=num_cpus).node_id


@contextlib.contextmanager
def hang_guard(seconds: int, what: str, detail=lambda: ""):
    """Fails the test (instead of hanging it) if the block takes longer than
    ``seconds``: SIGALRM raises in the main thread, which unwinds train() (its
    ``finally`` kills the actors). ``detail()`` goes into the message."""
    import signal

    def expired(signum, frame):
        raise AssertionError(f"{what} did not finish within {seconds}s; so far:\n"
                             f"{detail()}")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
def test_multi_node_cluster_node_lost_run_resumes_on_a_replacement_node(
        tmp_path, digits_parquet, monkeypatch):
    """Head: 1 CPU (the driver, the coordinator, the Ray Data read tasks and
    split coordinator); two nodes of 2 CPUs; ``cpus_per_worker: 1.5``, so the
    two workers cannot share a node (nor use the head)."""
    from distributed.train import worker as worker_module
    monkeypatch.setattr(worker_module, "Worker", raydata_inputs.NodeRecordingWorker)
    storage = str(tmp_path / "storage")
    steps = 100
    config = make_config(
        storage, "nodes", steps=steps, cpus_per_worker=1.5, log_every=10,
        # Materialized on the head: the blocks outlive any worker node, and no
        # read task needs a CPU the actors hold.
        params={"path": digits_parquet, "materialize": True, "pin_to_driver": True},
        checkpoint={"serving_every": 10, "full_every": 20},
        retention={"serving": {"keep_last": 20}, "full": {"keep_last": 20}},
        collective_timeout=20.0, max_failures=1)
    with environment(FOOTER_ACTORS), \
            simulated_cluster(head_cpus=1, node_cpus=2, nodes=2) as cluster:
        head = cluster.head_node.node_id
        initial_nodes = {n.node_id for n in cluster.worker_nodes}
        assert ray.get_runtime_context().get_node_id() == head
        joined, stderr = connects_without_token(cluster.address)
        assert not joined, "the cluster let in a client without the token"
        assert "token" in stderr.lower() or "auth" in stderr.lower(), stderr

        rng = random.Random(13)
        lines, losses = [], []

        def echo(line):
            lines.append(line)
            if not losses and "committed full checkpoint at step 20" in line:
                losses.append(NodeLoss(cluster, storage, rng))
            if losses and line.startswith("FAILURE"):
                # Before the trainer starts the new group: without this node
                # one of its workers could not be placed (and would wait).
                losses[0].replace(num_cpus=2)

        with hang_guard(900, "the run on the simulated cluster",
                        lambda: "\n".join(lines)):
            summary = trainer.train(config, echo=echo)
        assert losses, "\n".join(lines)
        loss = losses[0]
        assert loss.removed and loss.added, "\n".join(lines)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert loss.removed not in alive and loss.added in alive

    text = "\n".join(lines)
    # Placement: each group's two workers on two different non-head nodes; the
    # restarted group on the surviving node and the replacement.
    placed = raydata_inputs.read_worker_nodes(storage)
    assert len(placed) == 4, placed
    first, second = placed[:2], placed[2:]
    for group in (first, second):
        assert sorted(r["rank"] for r in group) == [0, 1], placed
        assert len({r["node_id"] for r in group}) == 2, placed
        assert head not in {r["node_id"] for r in group}, placed
    assert {r["node_id"] for r in first} == initial_nodes, placed
    assert loss.removed == next(r["node_id"] for r in first if r["rank"] == 0)
    assert {r["node_id"] for r in second} == (initial_nodes - {loss.removed}) | {
        loss.added}, placed

    # The job finished all its steps after one restart from a full checkpoint.
    assert summary["steps"] == steps, text
    assert len(summary["failures"]) == 1, text
    assert re.search(r"died|was lost|collective step failed", summary["failures"][0]), \
        summary["failures"]
    assert "FAILURE after step" in text, text
    resumed = re.search(r"restarted: resuming from the full checkpoint at step (\d+); "
                        r"(?:steps (\d+)\.\.(\d+) are redone \((\d+) steps\)|"
                        r"only the interrupted round's steps are redone)", text)
    assert resumed, text
    full = int(resumed.group(1))
    assert full >= 20 and full % 20 == 0, text
    if resumed.group(2) is not None:  # at most one full interval is lost
        first_redone, last_redone, count = map(int, resumed.groups()[1:])
        assert first_redone == full + 1 and count == last_redone - full <= 20, text
    progress = [int(m.group(1)) for m in
                (re.match(r"step (\d+)/\d+", line) for line in lines) if m]
    assert progress[-1] == steps, text

    keys = committed_and_sound(storage, "nodes")
    assert [s for t, s in keys if t == "serving"] == list(range(10, steps + 1, 10)), text
    assert [s for t, s in keys if t == "full"] == list(range(20, steps + 1, 20)), text
    final = tf.train.load_checkpoint(ckpt_prefix(storage, "nodes", "full", steps))
    assert final.get_tensor("global_step") == steps
