"""A partitioned embedding end to end (issue 11): trained through the
coordinator's real save path with 4 parts, restored by a stock Saver, exported
into a predict graph of 3 parts or none, inspected by the CLI, and refused
when its slices do not cover the table."""

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import CheckpointStore, CheckpointWriter, read_manifest
from distributed.cli.ckpt import main as ckpt_main
from distributed.errors import SliceLayoutError
from distributed.examples.digits import digits_eval_arrays
from distributed.serving import job
from distributed.train.coordinator import Coordinator
from tests.helpers.drivers import prepare, train_in_process
from tests.helpers.partitioned_models import DIM, VOCAB, reference_logits

MODELS = "tests.helpers.partitioned_models"
ROWS_PER_PART = VOCAB // 4


def config(storage, optimizer="adagrad", steps=20):
    return config_lib.from_dict({
        "model": f"{MODELS}:emb_model_fn", "storage": storage, "run": "r",
        "workers": 1, "steps": steps, "model_params": {"parts": 4},
        "optimizer": {"name": optimizer, "learning_rate": 0.5}})


def train(storage, optimizer="adagrad", steps=(10, 20)):
    return train_in_process(config(storage, optimizer, max(steps)), steps,
                            full_at_end=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run ``r``: serving checkpoints at steps 10 and 20 and a full one at 20,
    with the chief Session's values at step 20 (the logical table whole)."""
    storage = str(tmp_path_factory.mktemp("partitioned") / "storage")
    coord = train(storage)
    values = coord.sess.run({v.op.name: v for v in coord.tg.variables})
    values["emb"] = np.concatenate([values[f"emb/part_{i}"] for i in range(4)])
    return storage, coord, values


def serve(export_dir, images):
    fn = tf.saved_model.load(export_dir).signatures["serving_default"]
    return fn(image=tf.constant(images))["logits"].numpy()


@pytest.mark.parametrize("model", [None, f"{MODELS}:three_parts_model_fn",
                                   f"{MODELS}:unpartitioned_model_fn"])
def test_export_into_another_partitioning_serves_the_trained_values(trained, tmp_path,
                                                                     model):
    storage, _, values = trained
    result = job.restore_once(storage, "r", str(tmp_path / "export"), step=20,
                              model=model, echo=lambda s: None)
    images = digits_eval_arrays("test")[0]["image"][:40]
    want = reference_logits(values["emb"], values["head/kernel"], values["head/bias"],
                            images)
    np.testing.assert_allclose(serve(result.export_dir, images), want, rtol=1e-5,
                               atol=1e-5)


def test_a_stock_saver_restores_in_the_graph_that_trained(trained):
    storage, coord, values = trained
    graph = coord.tg.graph
    tables = [v for v in coord.tg.variables if re.fullmatch(r"emb/part_\d", v.op.name)]
    for tier, var_list in (("serving", tf.compat.v1.trainable_variables),
                           ("full", tf.compat.v1.global_variables)):
        prefix = os.path.join(storage, "r", "checkpoints", tier, "step-000000020",
                              "model.ckpt")
        with graph.as_default():
            coord.sess.run([v.assign(tf.zeros_like(v)) for v in tables])
            tf.compat.v1.train.Saver(var_list=var_list()).restore(coord.sess, prefix)
        got = np.concatenate(coord.sess.run(tables))
        np.testing.assert_array_equal(got, values["emb"])
    reader = tf.train.load_checkpoint(prefix)  # the full checkpoint
    shapes = reader.get_variable_to_shape_map()
    assert shapes["emb"] == shapes["emb/Adagrad"] == [VOCAB, DIM]
    assert not any("part_" in name for name in shapes)


def test_a_partitioned_run_resumes_from_its_full_checkpoint(trained, tmp_path):
    """The coordinator restores the table and its Adagrad slot from their
    logical tensors' slices (a fresh coordinator on a copy of the run)."""
    storage = shutil.copytree(trained[0], str(tmp_path / "storage"))
    coord = Coordinator(config(storage, steps=40).to_dict())
    plan = prepare(coord)
    try:
        assert plan.opened.resumed_from == 20 and plan.opened.start_step == 20
        got = coord.sess.run({v.op.name: v for v in coord.tg.variables})
        for name, value in trained[2].items():
            if name != "emb":
                np.testing.assert_array_equal(got[name], value, err_msg=name)
    finally:
        coord.sess.close()


@pytest.mark.parametrize("optimizer, factor", [("adagrad", 2), ("adam", 3)])
def test_serving_checkpoints_drop_the_tables_slots(trained, tmp_path, optimizer, factor):
    """Serving vs full bytes of a partitioned sparse embedding: Adagrad keeps
    one slot per table (>= 2x), Adam two (>= 3x)."""
    coord = trained[1] if optimizer == "adagrad" else train(str(tmp_path), optimizer,
                                                            steps=(3,))
    entries = {e.tier: e for e in coord.store.catalog.entries() if e.step == max(
        e.step for e in coord.store.catalog.entries())}
    ratio = entries["full"].num_bytes / entries["serving"].num_bytes
    assert ratio >= factor, (optimizer, ratio)
    assert entries["serving"].num_tensors == 3  # emb, head/kernel, head/bias


class LossyWriter:
    """A writer that loses one slice of ``emb`` from its manifest records (as
    a buggy or interrupted writer might), committed properly otherwise."""

    def __init__(self, writer, lost_slice):
        self._writer, self._lost = writer, lost_slice

    def write(self, sess, directory):
        written = self._writer.write(sess, directory)
        kept = tuple(r for r in written.records
                     if (r.name, r.slice) != ("emb", self._lost))
        assert len(kept) == len(written.records) - 1
        return dataclasses.replace(written, records=kept)


def test_a_checkpoint_whose_slices_leave_a_gap_is_refused(trained, tmp_path):
    storage = shutil.copytree(trained[0], str(tmp_path / "storage"))
    coord = trained[1]
    store = CheckpointStore(storage, "r")
    lost = f"{ROWS_PER_PART},{ROWS_PER_PART}:0,{DIM}"
    store.save(LossyWriter(coord.writers["serving"], lost), coord.sess, 30, "serving",
               "{}")
    gap = (rf"partitioned variable 'emb' \[{VOCAB}, {DIM}\] do not cover it: indices "
           rf"\[{ROWS_PER_PART}, {2 * ROWS_PER_PART}\) of dimension 0 are in no slice")
    with pytest.raises(SliceLayoutError, match=gap):
        store.verify(30)
    with pytest.raises(SliceLayoutError, match=gap):
        job.restore_once(storage, "r", str(tmp_path / "a"), step=30, echo=lambda s: None)
    said = []
    result = job.restore_once(storage, "r", str(tmp_path / "b"), echo=said.append)
    assert result.step == 20
    assert any("step 30 fails verification" in s and "'emb'" in s for s in said)
    code = ckpt_main(["verify", "30", "--storage", storage, "--run", "r"])
    assert code == 1


def save_as_three_parts(storage, values, step, nudge=0.0):
    """Writes the trained values from a graph that cuts ``emb`` in 3 parts."""
    graph = tf.Graph()
    with graph.as_default():
        emb = tf.compat.v1.get_variable(
            "emb", [VOCAB, DIM], partitioner=tf.compat.v1.fixed_size_partitioner(3))
        head = [tf.compat.v1.get_variable(n, values[n].shape)
                for n in ("head/kernel", "head/bias")]
        with tf.compat.v1.Session() as sess:
            start = 0
            for part in emb:
                rows = part.shape[0]
                part.load(values["emb"][start:start + rows] + nudge, sess)
                start += rows
            for v in head:
                v.load(values[v.op.name], sess)
            CheckpointStore(storage, "r").save(
                CheckpointWriter(list(emb) + head), sess, step, "serving", "{}")


def test_show_and_diff_see_one_logical_table(trained, tmp_path, capsys):
    storage = shutil.copytree(trained[0], str(tmp_path / "storage"))
    save_as_three_parts(storage, trained[2], 30)
    save_as_three_parts(storage, trained[2], 31, nudge=0.5)
    run = ["--storage", storage, "--run", "r"]
    assert ckpt_main(["show", "30", *run]) == 0
    out = capsys.readouterr().out
    assert "3 tensors (5 rows: a partitioned variable has one per slice)" in out
    emb_rows = [line.split() for line in out.splitlines()
                if line.startswith("emb ") and "float32" in line]
    assert [r[4] for r in emb_rows] == ["0,363:0,8", "363,363:0,8", "726,362:0,8"]
    assert ckpt_main(["diff", "20", "30", "--json", *run]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"]["unchanged"] == 3 and doc["counts"]["changed"] == 0
    assert ckpt_main(["diff", "20", "31", "--json", *run]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["tensors"]}
    assert rows["emb"]["status"] == "changed"
    assert rows["emb"]["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    assert rows["head/kernel"]["status"] == "unchanged"
    assert len(read_manifest(os.path.join(
        storage, "r", "checkpoints", "serving", "step-000000031")).by_name()["emb"]) == 3
