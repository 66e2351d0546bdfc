"""The coordinator in-process (no Ray): what it does when a run resumes."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.checkpoint.verify import verify_checkpoint
from distributed.train.coordinator import Coordinator
from tests.helpers.drivers import prepare


def prepared(tmp_path, model: str, **checkpoint) -> tuple[Coordinator, dict]:
    """A run's first coordinator, prepared; returns it and its initial values."""
    cfg = config_lib.from_dict({
        "storage": str(tmp_path), "run": "r", "steps": 100,
        "model": f"distributed.examples.digits:{model}", "checkpoint": checkpoint})
    first = Coordinator(cfg.to_dict())
    prepare(first)
    return first, first.initial_values()


def test_serving_checkpoint_lost_with_a_failure_is_recreated_from_the_full_one(tmp_path):
    first, values = prepared(tmp_path, "cnn_bn_model_fn", serving_every=10, full_every=20)
    cfg = first.config
    values["global_step"] = np.int64(20)
    first.save(20, "full", values, {"loss": 0.5})  # rank 0 died before "serving"
    first.sess.close()

    second = Coordinator(cfg.to_dict(), restarting=True)
    plan = prepare(second)
    second.sess.close()
    assert (plan.opened.start_step, plan.opened.resumed_from,
            plan.opened.recreated_serving) == \
        (20, 20, 20)
    run = RunLayout(str(tmp_path), "r")
    assert {(e.step, e.tier) for e in Catalog(run).entries()} == {(20, "full"),
                                                                 (20, "serving")}
    serving = run.checkpoint_dir("serving", 20)
    verify_checkpoint(serving)
    reader = tf.train.load_checkpoint(os.path.join(serving, "model.ckpt"))
    names = set(reader.get_variable_to_shape_map())
    assert names == set(plan.build.serving_names) and "cnn/conv_0/bn/moving_mean" in names
    for name in names:
        np.testing.assert_array_equal(reader.get_tensor(name), values[name], err_msg=name)

    # Nothing missing: nothing re-created.
    third = Coordinator(cfg.to_dict(), restarting=True)
    assert prepare(third).opened.recreated_serving is None
    third.sess.close()


def test_full_checkpoint_that_fails_verification_is_quarantined_and_rewritten(tmp_path):
    first, values = prepared(tmp_path, "mlp_model_fn", serving_every=0, full_every=20)
    cfg = first.config
    for step in (20, 40):
        values["global_step"] = np.int64(step)
        assert not first.save(step, "full", values, {"loss": 0.5}).already_committed
    first.sess.close()
    run = RunLayout(str(tmp_path), "r")
    shard = next(os.path.join(run.checkpoint_dir("full", 40), n)
                 for n in os.listdir(run.checkpoint_dir("full", 40)) if ".data-" in n)
    with open(shard, "r+b") as f:
        f.seek(7)
        byte = f.read(1)
        f.seek(7)
        f.write(bytes([byte[0] ^ 0x20]))

    second = Coordinator(cfg.to_dict(), restarting=True)
    plan = prepare(second)
    assert (plan.opened.start_step, plan.opened.resumed_from) == (20, 20)
    assert any("step 40 does not verify" in w and "quarantine" in w
               for w in plan.opened.warnings), plan.opened.warnings
    assert {(e.step, e.tier) for e in Catalog(run).entries()} == {(20, "full")}
    (kept,) = os.listdir(run.quarantine_dir)
    assert kept.startswith("full-step-000000040-")
    with open(os.path.join(run.quarantine_dir, kept, "REASON.txt")) as f:
        assert os.path.basename(shard) in f.read()
    assert not os.path.exists(run.checkpoint_dir("full", 40))

    # Step 40 redone: a fresh checkpoint is written, not the corrupt one "kept".
    values = second.initial_values()
    values["global_step"] = np.int64(40)
    result = second.save(40, "full", values, {"loss": 0.4})
    second.sess.close()
    assert not result.already_committed
    verify_checkpoint(run.checkpoint_dir("full", 40))
    # The next start leaves the quarantine alone.
    third = Coordinator(cfg.to_dict(), restarting=True)
    assert prepare(third).opened.resumed_from == 40
    third.sess.close()
    assert os.listdir(run.quarantine_dir) == [kept]
