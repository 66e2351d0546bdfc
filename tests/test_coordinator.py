"""The coordinator in-process (no Ray): what it does when a run resumes."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.checkpoint.verify import verify_checkpoint
from distributed.train.coordinator import Coordinator


def test_serving_checkpoint_lost_with_a_failure_is_recreated_from_the_full_one(tmp_path):
    cfg = config_lib.from_dict({
        "storage": str(tmp_path), "run": "r", "steps": 100,
        "model": "distributed.examples.digits:cnn_bn_model_fn",
        "checkpoint": {"serving_every": 10, "full_every": 20}})
    first = Coordinator(cfg.to_dict())
    first.prepare()
    values = first.initial_values()
    values["global_step"] = np.int64(20)
    first.save(20, "full", values, {"loss": 0.5})  # rank 0 died before "serving"
    first.sess.close()

    second = Coordinator(cfg.to_dict(), restarting=True)
    plan = second.prepare()
    second.sess.close()
    assert (plan["start_step"], plan["resumed_from"], plan["recreated_serving"]) == \
        (20, 20, 20)
    run = RunLayout(str(tmp_path), "r")
    assert {(e.step, e.tier) for e in Catalog(run).entries()} == {(20, "full"),
                                                                 (20, "serving")}
    serving = run.checkpoint_dir("serving", 20)
    verify_checkpoint(serving)
    reader = tf.train.load_checkpoint(os.path.join(serving, "model.ckpt"))
    names = set(reader.get_variable_to_shape_map())
    assert names == set(plan["serving_names"]) and "cnn/conv_0/bn/moving_mean" in names
    for name in names:
        np.testing.assert_array_equal(reader.get_tensor(name), values[name], err_msg=name)

    # Nothing missing: nothing re-created.
    third = Coordinator(cfg.to_dict(), restarting=True)
    assert third.prepare()["recreated_serving"] is None
    third.sess.close()
