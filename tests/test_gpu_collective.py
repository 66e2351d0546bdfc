"""What the gradient all-reduce actually ran, not what its config says.

Each worker runs the project's all-reduce (``collective.allreduce_gradients``
placed as the worker places its train graph) in a Session with a full trace
(``RunOptions.trace_level``), and reports the devices TensorFlow executed the
``CollectiveReduceV2`` ops on. On GPUs the workers also run with
``NCCL_DEBUG=INFO`` into per-process files: NCCL writing them proves NCCL ran.

A two-rank NCCL all-reduce needs two GPUs (NCCL refuses two ranks on one
device), so the GPU test skips with fewer; the CPU variant checks the same
trace on the ring transport everywhere.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import ray

from tests.conftest import REPO_ROOT
from tests.helpers.gpus import gpus_visible

pytestmark = pytest.mark.ray

SHAPES = [(64, 32), (32,), (10,)]


def _grads(rank: int) -> list[np.ndarray]:
    """Integer-valued, so the float mean of two ranks is exact."""
    rng = np.random.default_rng(rank)
    return [rng.integers(-50, 50, s).astype(np.float32) for s in SHAPES]


class _Traced:
    """One rank: its TF server, the all-reduce graph, a traced Session run."""

    def __init__(self):
        from distributed.train import collective
        self.address = f"{ray.util.get_node_ip_address()}:{collective.pick_free_port()}"

    def get_address(self) -> str:
        return self.address

    def run(self, addresses: list[str], rank: int, device: str | None):
        import tensorflow as tf

        from distributed.train import collective
        spec = collective.GroupSpec(tuple(addresses), rank, timeout_seconds=120.0)
        server = collective.start_server(spec)
        graph = tf.Graph()
        with graph.as_default(), tf.device(device):  # as Worker.setup places its graph
            variables = [tf.compat.v1.get_variable(f"v{i}", s) for i, s in enumerate(SHAPES)]
            pairs = [(tf.constant(g), v) for g, v in zip(_grads(rank), variables)]
            fetch = [g for g, _ in collective.allreduce_gradients(pairs, spec, bucket_bytes=4096)]
        options = collective.run_options(spec)
        options.trace_level = tf.compat.v1.RunOptions.FULL_TRACE
        metadata = tf.compat.v1.RunMetadata()
        with tf.compat.v1.Session(server.target, graph=graph,
                                  config=collective.session_config(spec)) as sess:
            out = sess.run(fetch, options=options, run_metadata=metadata)
        names = {op.name for op in graph.get_operations()
                 if op.type in ("CollectiveReduceV2", "CollectiveGatherV2")}
        ran = sorted({(node.node_name, dev.device) for dev in metadata.step_stats.dev_stats
                      for node in dev.node_stats if node.node_name in names})
        planned = len(names)
        return {"pid": os.getpid(), "hint": spec.resolved_hint(), "out": out,
                "ran": ran, "planned": planned}


def _run_pair(num_gpus: int, device: str | None, env: dict[str, str]) -> list[dict]:
    actor = ray.remote(num_cpus=0.5, num_gpus=num_gpus)(_Traced)
    runtime_env = {"env_vars": {"PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "2", **env}}
    workers = [actor.options(runtime_env=runtime_env).remote() for _ in range(2)]
    try:
        addresses = ray.get([w.get_address.remote() for w in workers])
        return ray.get([w.run.remote(addresses, r, device) for r, w in enumerate(workers)],
                       timeout=300)
    finally:
        for w in workers:
            ray.kill(w)


def _check_mean(results: list[dict]) -> None:
    want = [(a + b) / 2 for a, b in zip(_grads(0), _grads(1))]
    for result in results:
        for got, expected in zip(result["out"], want):
            np.testing.assert_array_equal(got, expected)


def test_cpu_workers_ran_the_collective_on_their_cpus_over_the_ring(local_ray):
    results = _run_pair(0, None, {"CUDA_VISIBLE_DEVICES": ""})
    _check_mean(results)
    for rank, result in enumerate(results):
        assert result["hint"] == "ring"
        # Every planned collective ran, each once, on this worker's CPU.
        assert result["planned"] >= 2 and len(result["ran"]) == result["planned"], result
        for name, device in result["ran"]:
            assert device.startswith(f"/job:worker/replica:0/task:{rank}/device:CPU:"), \
                (name, device)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_workers_ran_the_collective_on_their_gpus_with_nccl(local_ray, tmp_path):
    gpus = gpus_visible()
    if gpus == 0:
        pytest.skip("no GPU visible to TensorFlow")
    if gpus < 2 or ray.cluster_resources().get("GPU", 0) < 2:
        pytest.skip(f"a two-rank NCCL all-reduce needs two GPUs (NCCL refuses two ranks "
                    f"on one device); TensorFlow sees {gpus}, the local Ray "
                    f"{ray.cluster_resources().get('GPU', 0):g}")
    logs = str(tmp_path / "nccl.%p.log")
    results = _run_pair(1, "/device:GPU:0", {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_FILE": logs})
    _check_mean(results)
    for rank, result in enumerate(results):
        assert result["hint"] == "nccl"
        assert result["planned"] >= 2 and len(result["ran"]) == result["planned"], result
        for name, device in result["ran"]:  # executed on the GPU, not the host
            assert device.startswith(f"/job:worker/replica:0/task:{rank}/device:GPU:"), \
                (name, device)
        # NCCL itself ran in this worker: it wrote its debug log there.
        (log,) = glob.glob(str(tmp_path / f"nccl.{result['pid']}.log"))
        with open(log) as f:
            text = f.read()
        assert "NCCL INFO" in text, text[-2000:]
