"""The checkpoint CLI on real checkpoints: every subcommand, every output form,
damage, retention and bad input. Runs ``main(argv)`` in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from distributed import config as config_lib
from distributed.checkpoint import (Catalog, CheckpointStore, CheckpointWriter, Lease,
                                    SelectionSpec, read_manifest, select_variables)
from distributed.cli.ckpt import main
from distributed.train.coordinator import RUN_CONFIG_FILE
from tests.conftest import REPO_ROOT, build_tiny_model
from tests.helpers.damage import flip

RUN = "run"
LOSSES = {1: 0.5, 2: 0.25, 3: 0.375}
NUDGE = 0.5  # added to head/kernel between steps 1 and 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One run, written once: serving steps 1-3 (head/kernel nudged between 1
    and 2, a training step between 2 and 3), a full checkpoint at step 4 only,
    and the run record with retention serving keep_last 2."""
    import tensorflow as tf

    storage = str(tmp_path_factory.mktemp("ckpt_cli") / "storage")
    model = build_tiny_model()
    serving, _ = select_variables(model.graph, SelectionSpec("trainable"))
    everything, _ = select_variables(model.graph, SelectionSpec("all"))
    writers = {"serving": CheckpointWriter(serving),
               "full": CheckpointWriter(everything, num_shards=2)}
    kernel = next(v for v in model.variables if v.op.name == "head/kernel")
    with model.graph.as_default():
        nudge = kernel.assign_add(tf.fill(kernel.shape, NUDGE))
    store = CheckpointStore(storage, RUN)
    store.open()
    store.save(writers["serving"], model.sess, 1, "serving", "{}", {"loss": LOSSES[1]})
    model.sess.run(nudge)
    store.save(writers["serving"], model.sess, 2, "serving", "{}", {"loss": LOSSES[2]})
    model.sess.run(model.train_op, {model.x: np.ones((4, 8), np.float32)})
    store.save(writers["serving"], model.sess, 3, "serving", "{}", {"loss": LOSSES[3]})
    store.save(writers["full"], model.sess, 4, "full", '{"policy": "all"}')
    model.sess.close()
    config = config_lib.from_dict({"run": RUN, "storage": storage,
                                   "retention": {"serving": {"keep_last": 2}}})
    with open(os.path.join(store.layout.root, RUN_CONFIG_FILE), "w") as f:
        json.dump({"config": config.to_dict()}, f)
    return storage


@pytest.fixture
def storage_copy(built, tmp_path):
    """A private copy of the run, for tests that damage or delete."""
    return shutil.copytree(built, str(tmp_path / "storage"))


def cli(capsys, storage, *argv):
    """Runs the CLI; returns (exit code, stdout, stderr)."""
    code = main([*argv, "--storage", storage, "--run", RUN])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, storage, *argv):
    code, out, err = cli(capsys, storage, *argv, "--json")
    return code, json.loads(out)


# -- ls ----------------------------------------------------------------------


def test_ls_prints_the_catalog(capsys, built):
    code, out, err = cli(capsys, built, "ls")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert "4 committed checkpoints" in lines[0]
    assert lines[1].split() == ["tier", "step", "tensors", "MiB", "shards", "loss",
                                "committed_at", "path"]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [("full", "4"), ("serving", "1"),
                                            ("serving", "2"), ("serving", "3")]
    assert rows[1][5] == "0.5" and rows[1][-1] == "checkpoints/serving/step-000000001"
    assert rows[0][4] == "2"  # the full checkpoint's shards


def test_ls_json_and_parquet(capsys, built, tmp_path):
    path = str(tmp_path / "ls.parquet")
    code, doc = cli_json(capsys, built, "ls", "--tier", "serving", "--parquet", path)
    assert code == 0
    assert [c["step"] for c in doc["checkpoints"]] == [1, 2, 3]
    assert [c["metrics"]["loss"] for c in doc["checkpoints"]] == [0.5, 0.25, 0.375]
    table = pq.read_table(path)
    assert table.column("step").to_pylist() == [1, 2, 3]
    assert set(table.column("tier").to_pylist()) == {"serving"}
    assert table.column("num_bytes").to_pylist() == \
        [c["num_bytes"] for c in doc["checkpoints"]]


# -- show --------------------------------------------------------------------


def test_show_lists_tensors_and_bytes_per_scope(capsys, built, tmp_path):
    code, out, _ = cli(capsys, built, "show", "1")
    assert code == 0
    assert "serving checkpoint at step 1" in out and "loss 0.5" in out
    kernel = next(line for line in out.splitlines() if line.startswith("head/kernel"))
    assert kernel.split()[1:] == ["float32", "[16,", "3]", "192",
                                  "model.ckpt.data-00000-of-00001"]
    scopes = out.split("bytes per scope (depth 1):")[1].splitlines()
    assert scopes[2].split()[0] == "tower" and scopes[3].split()[:3] == ["head", "1", "192"]

    path = str(tmp_path / "show.parquet")
    code, doc = cli_json(capsys, built, "show", "1", "--depth", "2", "--parquet", path)
    assert code == 0 and doc["checkpoint"]["step"] == 1
    total = doc["checkpoint"]["num_bytes"]
    assert sum(s["bytes"] for s in doc["scopes"]) == total
    assert "tower/dense" in {s["scope"] for s in doc["scopes"]}
    table = pq.read_table(path)
    assert table.num_rows == len(doc["tensors"]) == doc["checkpoint"]["num_tensors"]
    assert sum(table.column("length").to_pylist()) == total
    row = table.filter(pq.filters_to_expression([("name", "=", "tower/dense/kernel")]))
    assert row.column("scope").to_pylist() == ["tower/dense"]
    assert row.column("shape").to_pylist() == [[8, 16]]


def test_show_finds_a_step_only_the_full_tier_has(capsys, built):
    code, doc = cli_json(capsys, built, "show", "4")
    assert code == 0 and doc["checkpoint"]["tier"] == "full"
    assert any("Adam" in t["name"] for t in doc["tensors"])  # optimizer slots


# -- verify ------------------------------------------------------------------


def test_verify_all_ok(capsys, built, tmp_path):
    code, out, _ = cli(capsys, built, "verify")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[:4] for line in lines[:-1]] == [
        ["OK", "full", "step", "4"], ["OK", "serving", "step", "1"],
        ["OK", "serving", "step", "2"], ["OK", "serving", "step", "3"]]
    assert lines[-1] == "0 of 4 checkpoint(s) bad"
    path = str(tmp_path / "verify.parquet")
    code, doc = cli_json(capsys, built, "verify", "2", "--parquet", path)
    assert code == 0 and doc["ok"] and [c["step"] for c in doc["checkpoints"]] == [2]
    assert pq.read_table(path).to_pylist()[0]["problems"] == []


def test_verify_names_a_flipped_byte(capsys, storage_copy):
    store = CheckpointStore(storage_copy, RUN)
    ckpt = store.layout.checkpoint_dir("serving", 2)
    target = next(t for t in read_manifest(ckpt).tensors if t.name == "head/kernel")
    shard = os.path.join(ckpt, target.shard)
    flip(shard, target.offset + 5)
    code, out, _ = cli(capsys, storage_copy, "verify")
    assert code == 1
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "serving step 2" in bad[0]
    assert "'head/kernel'" in bad[0] and shard in bad[0] and "CRC-32C" in bad[0]
    assert out.splitlines()[-1] == "1 of 4 checkpoint(s) bad"
    assert cli(capsys, storage_copy, "verify", "3")[0] == 0
    code, doc = cli_json(capsys, storage_copy, "verify", "2")
    assert code == 1 and not doc["ok"]
    [problem] = doc["checkpoints"][0]["problems"]
    assert problem["path"] == shard and problem["tensor"] == "head/kernel"
    assert "CRC-32C mismatch" in problem["message"]


def test_a_damaged_catalog_row(capsys, storage_copy):
    catalog = Catalog(CheckpointStore(storage_copy, RUN).layout)
    row = os.path.join(catalog.directory, catalog.committed_keys()[1, "serving"])
    flip(row, 40)
    code, out, err = cli(capsys, storage_copy, "ls")
    assert code == 0 and "3 committed checkpoints" in out
    assert err.startswith("warning: skipping the serving checkpoint at step 1") \
        and row in err
    code, out, _ = cli(capsys, storage_copy, "verify")
    assert code == 1 and row in next(x for x in out.splitlines() if x.startswith("BAD"))
    code, _, err = cli(capsys, storage_copy, "show", "1")
    assert code == 2 and err.startswith("error: ") and row in err
    assert err.count("\n") == 1


# -- diff --------------------------------------------------------------------


def test_diff_names_the_changed_tensor(capsys, built, tmp_path):
    code, out, _ = cli(capsys, built, "diff", "1", "2")
    assert code == 0
    summary, header, *rows = out.splitlines()
    assert "A = serving step 1, B = serving step 2: 1 changed" in summary
    assert rows[0].split()[:2] == ["changed", "head/kernel"]
    assert rows[0].split()[-2] == "0.5" and len(rows) == 1  # unchanged are hidden

    path = str(tmp_path / "diff.parquet")
    code, doc = cli_json(capsys, built, "diff", "1", "2", "--parquet", path)
    assert code == 0 and doc["counts"]["changed"] == 1
    by_name = {t["name"]: t for t in doc["tensors"]}
    kernel = by_name["head/kernel"]
    assert kernel["status"] == "changed"
    assert kernel["max_abs_diff"] == pytest.approx(NUDGE)
    import tensorflow as tf  # the stock reader, as a cross-check
    reader = tf.train.load_checkpoint(
        os.path.join(built, RUN, "checkpoints/serving/step-000000001/model.ckpt"))
    before = reader.get_tensor("head/kernel")
    assert kernel["rel_l2_change"] == pytest.approx(
        NUDGE * np.sqrt(before.size) / np.linalg.norm(before))
    assert {t["status"] for n, t in by_name.items() if n != "head/kernel"} == {"unchanged"}
    table = pq.read_table(path)
    assert table.num_rows == len(doc["tensors"])
    assert set(table.column("status").to_pylist()) == {"changed", "unchanged"}


def test_diff_across_tiers_lists_tensors_only_in_one(capsys, built):
    code, doc = cli_json(capsys, built, "diff", "3", "4")
    assert code == 0 and doc["a"] == {"tier": "serving", "step": 3}
    assert doc["b"] == {"tier": "full", "step": 4}
    only_b = {t["name"] for t in doc["tensors"] if t["status"] == "only_b"}
    assert "tower/bn/moving_mean" in only_b and "global_step" in only_b
    assert doc["counts"]["unchanged"] > 0 and doc["counts"]["only_a"] == 0
    code, out, _ = cli(capsys, built, "diff", "3", "4", "--all")
    assert "only in B" in out and "unchanged" in out.splitlines()[-1]


# -- gc ----------------------------------------------------------------------


def _plant_leftovers(store: CheckpointStore) -> list[str]:
    """A crashed save's tmp directory and an orphan step directory, made to
    look old so they do not count as a live writer's footprints."""
    tier_dir = store.layout.tier_dir("serving")
    paths = [os.path.join(tier_dir, "step-000000009.tmp-dead"),
             os.path.join(tier_dir, "step-000000008")]
    for path in paths:
        os.makedirs(path)
        os.utime(path, (0, 0))
    return paths


def _age_run(store: CheckpointStore, seconds: float = 3600) -> None:
    """Backdates the trainer's footprints, as if the run stopped ``seconds`` ago."""
    for directory in (store.layout.catalog_dir, store.layout.root):
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                mtime = os.path.getmtime(path) - seconds
                os.utime(path, (mtime, mtime))


def test_gc_refuses_beside_a_recent_writer(capsys, storage_copy):
    code, _, err = cli(capsys, storage_copy, "gc", "--keep-last", "1")
    assert code == 2 and "may still be training" in err and "--force" in err
    assert len(Catalog(CheckpointStore(storage_copy, RUN).layout).committed_keys()) == 4


def test_gc_dry_run_then_real(capsys, storage_copy):
    store = CheckpointStore(storage_copy, RUN)
    leftovers = _plant_leftovers(store)
    _age_run(store)
    before = sorted(os.listdir(store.layout.tier_dir("serving")))
    code, out, _ = cli(capsys, storage_copy, "gc", "--keep-last", "1", "--dry-run")
    assert code == 0
    assert "would delete serving step 1" in out and "would delete serving step 2" in out
    assert all(f"would remove leftover {p}" in out for p in leftovers)
    assert out.splitlines()[-1] == "dry run: nothing was deleted"
    assert sorted(os.listdir(store.layout.tier_dir("serving"))) == before
    assert len(store.catalog.committed_keys()) == 4

    code, doc = cli_json(capsys, storage_copy, "gc", "--keep-last", "1")
    assert code == 0 and not doc["dry_run"] and doc["retention_source"] == "flags"
    assert [(d["tier"], d["step"]) for d in doc["deleted"]] == [("serving", 1),
                                                                ("serving", 2)]
    assert set(leftovers) <= set(doc["leftovers"])
    assert sorted(store.catalog.committed_keys()) == [(3, "serving"), (4, "full")]
    assert os.listdir(store.layout.tier_dir("serving")) == ["step-000000003"]
    assert os.listdir(store.layout.tier_dir("full")) == ["step-000000004"]


def test_gc_applies_the_recorded_retention_and_spares_leased_files(capsys, storage_copy):
    store = CheckpointStore(storage_copy, RUN)
    step1 = store.layout.checkpoint_dir("serving", 1)
    with Lease(store.layout, "serving", 1):
        code, out, _ = cli(capsys, storage_copy, "gc", "--force")
        assert code == 0
        assert "retention from run_config.json: serving keep_last=2; full keep all" in out
        assert "delete serving step 1" in out and "readers finish" in out
        assert sorted(store.catalog.committed_keys()) == [
            (2, "serving"), (3, "serving"), (4, "full")]
        assert os.path.isdir(step1)  # the reader still has its files
    code, doc = cli_json(capsys, storage_copy, "gc", "--force")  # the reader is done
    assert code == 0 and doc["deleted"] == [] and doc["leftovers"] == [step1]
    assert not os.path.exists(step1)


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["ls", "--run", "nope"], "run 'nope' not found under"),
    (["ls", "--run", "../x"], "--run: run name '../x' is not valid"),
    (["show", "7"], "has no committed serving checkpoint at step 7 (latest serving "
                    "steps: 1, 2, 3)"),
    (["show", "-1"], "argument step: expected a step in [0, 1000000000), got '-1'"),
    (["verify", "1000000000"], "expected a step in [0, 1000000000)"),
    (["verify", "7", "--tier", "full"], "no committed full checkpoint at step 7"),
    (["diff", "1", "7"], "no committed serving checkpoint at step 7"),
    (["ls", "--tier", "cold"], "argument --tier: invalid choice: 'cold'"),
    (["show", "1", "--depth", "0"], "--depth: expected an integer >= 1"),
    (["gc", "--keep-best-n", "2"], "--keep-best-n needs --keep-best METRIC"),
    (["gc", "--keep-best", "loss:lowest"], "is not METRIC[:min|max]"),
    (["gc", "--keep-last", "0"], "--keep-last: expected an integer >= 1"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line(capsys, built, argv, fragment):
    if "--run" not in argv:
        argv = [*argv, "--run", RUN]
    code = main([*argv, "--storage", built])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err


def test_gc_needs_retention_when_the_run_recorded_none(capsys, storage_copy):
    os.unlink(os.path.join(storage_copy, RUN, RUN_CONFIG_FILE))
    code, _, err = cli(capsys, storage_copy, "gc", "--force")
    assert code == 2 and "no run_config.json recording its retention" in err


def test_module_entry_point_and_no_tensorflow(built):
    """``python -m distributed.ckpt`` runs, and no read-only command imports TF."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    help_ = subprocess.run([sys.executable, "-m", "distributed.ckpt", "ls", "--help"],
                           capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert help_.returncode == 0 and "--tier" in help_.stdout
    script = (
        "import sys\nfrom distributed.cli.ckpt import main\n"
        f"args = ['--storage', {built!r}, '--run', {RUN!r}, '--json']\n"
        "for cmd in (['ls'], ['show', '1'], ['verify'], ['diff', '1', '2']):\n"
        "    assert main(cmd + args) == 0, cmd\n"
        "assert 'tensorflow' not in sys.modules\n"
        "import os; os._exit(0)  # no teardown: see distributed.cli.ckpt.cli.run\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
