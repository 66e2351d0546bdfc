"""Placement on a GPU worker, checked on a CPU.

Every example's train (one step, and the ``steps_per_run`` loop), eval and
predict graph is built as a GPU worker builds it (everything under
``/device:GPU:0``, a two-rank NCCL all-reduce, tf.data prefetched to the GPU;
``tests/helpers/placement_cases.py``), and TensorFlow's kernel registry says where
each op would run (:mod:`distributed.train.placement`): every op asked onto
the GPU has a GPU kernel for its dtypes or is moved to the CPU by the
worker's soft placement, and every collective stays on the GPU. Run with
``-s`` to see the finding per graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.inputs import probe_spec
from distributed.train import collective
from distributed.train.graph import build_train_graph
from distributed.train.placement import check_gpu_placement
from tests.helpers import placement_cases as pc

MODES = [("train", 1), ("train", 4), ("eval", 1), ("predict", 1)]
# MobileNet (~10 s a graph): only its loop graph. Its one-step, eval and predict
# graphs hold no op type that this graph or another example's graphs do not
# (checked when this was cut, 2026-12-07), at a quarter of the cost.
ONLY_THE_LOOP = {"keras_app"}
# What soft placement moves to the CPU, per example (op types); anything new
# fails here so that someone looks at it.
EXPECTED_ON_CPU = {
    # Hashed ids: tf.strings.as_string / join / to_hash_bucket_fast and the
    # salt constants have CPU kernels only.
    "wide_deep": {"AsString", "StringJoin", "StringToHashBucketFast", "Const"},
    "wide_deep_ps": {"AsString", "StringJoin", "StringToHashBucketFast", "Const"},
    # piecewise_constant's Assert carries a string constant.
    "digits_mlp_piecewise": {"Const"},
}
NAMES = list(pc.cases()) + ["images_tfdata"]
# Parameter servers refuse steps_per_run > 1 (rank 0 updates them once per run).
NO_LOOP = {name for name, case in pc.cases().items() if pc.loop_steps(case) == 1}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return pc.cases(str(tmp_path_factory.mktemp("records")))


@pytest.mark.parametrize("name,mode,steps", [
    pytest.param(name, mode, steps, marks=[pytest.mark.slow] if name in ONLY_THE_LOOP else [],
                 id=f"{name}-{mode}{'-loop' if steps > 1 else ''}")
    for name in NAMES for mode, steps in MODES
    if (name not in ONLY_THE_LOOP or steps > 1)
    and not (name in NO_LOOP and steps > 1)])
def test_every_op_asked_onto_the_gpu_runs_there_or_is_soft_placed(cases, name, mode,
                                                                   steps):
    report = check_gpu_placement(pc.build(cases[name], mode, steps))
    print(f"\n{name} {mode}{' (loop)' if steps > 1 else ''}: {report.summary()}")
    assert not report.unplaceable
    moved = {key.split(" ")[0] for key in report.soft_placed}
    assert moved <= EXPECTED_ON_CPU.get(name, set()), report.summary()
    assert report.on_gpu > 0
    if moved:
        assert collective.session_config(pc.gpu_spec()).allow_soft_placement
    if mode == "train":
        assert report.collectives, "no all-reduce in a two-rank train graph"
    for node, op, device, gpu_kernel in report.collectives:
        assert device == "/job:worker/replica:0/task:0/device:GPU:0", (node, device)
        assert gpu_kernel, (node, op)


def test_a_gpu_workers_graph_with_string_ops_runs_under_the_workers_session_config():
    """On this CPU nothing can run on GPU:0: without soft placement the graph
    (the piecewise schedule's string constant included) fails placement, as
    it would on a GPU; with the worker's session config it trains a step.
    The server here is started without soft placement: a server's own config
    is merged into every Session's (``collective.start_server`` gives it the
    worker's, so there even a plain Session config is soft)."""
    cfg = config_lib.from_dict({**pc.cases()["digits_mlp_piecewise"], "workers": 1})
    spec = collective.GroupSpec((f"localhost:{collective.pick_free_port()}",), 0)
    strict = collective.session_config(spec)
    strict.allow_soft_placement = False
    server = tf.distribute.Server(tf.train.ClusterSpec({collective.JOB_NAME: list(
        spec.addresses)}), job_name=collective.JOB_NAME, task_index=0, config=strict)
    tg = build_train_graph(cfg, probe_spec(cfg), device=pc.GPU)
    feed = {tg.features["image"]: np.zeros([8, 64], np.float32),
            tg.labels: np.zeros([8], np.int64)}
    init = tg.initializers.run if hasattr(tg, "initializers") else (
        lambda sess: sess.run(tg.init_op))
    with tf.compat.v1.Session(server.target, graph=tg.graph, config=strict) as sess:
        with pytest.raises(tf.errors.InvalidArgumentError, match="[Dd]evice"):
            init(sess)
    with tf.compat.v1.Session(server.target, graph=tg.graph,
                              config=collective.session_config(spec)) as sess:
        init(sess)
        loss = sess.run([tg.train_op, tg.loss], feed)[1]
    assert np.isfinite(loss)
