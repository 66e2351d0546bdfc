"""GPU readiness, checked without a GPU: one NCCL rank per GPU, bfloat16 over
NCCL, the worker's session config, actors that hold no GPU, and a node that
declares a GPU its TensorFlow cannot see (through ``python -m jobs.train``
against a local Ray head started with ``--num-gpus=1``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.errors import ConfigError
from distributed.train import collective, devices
from tests.conftest import REPO_ROOT
from tests.helpers.placement_cases import TWO_RANKS, gpu_spec

MLP = "distributed.examples.digits:mlp_model_fn"


# ---------------------------------------------------------- one rank per GPU


def test_a_fraction_of_a_gpu_is_for_one_worker_only():
    with pytest.raises(ConfigError, match=r"^gpus_per_worker: 0\.5 with 2 workers would "
                                          r"put two workers on one GPU.*NCCL refuses"):
        config_lib.from_dict({"gpus_per_worker": 0.5, "workers": 2})
    config_lib.from_dict({"gpus_per_worker": 0.5, "workers": 1})
    config_lib.from_dict({"gpus_per_worker": 2, "workers": 2})
    with pytest.raises(ConfigError, match=r"^gpus_per_worker: expected 0, a whole"):
        config_lib.from_dict({"gpus_per_worker": 1.5, "workers": 1})


# ------------------------------------------------------------- bf16 and NCCL


def _collective_inputs(graph):
    return {op.type: op.inputs[0].dtype for op in graph.get_operations()
            if op.type.startswith("Collective")}


def _bf16_graph(spec):
    graph = tf.Graph()
    with graph.as_default():
        table = tf.compat.v1.get_variable("table", [1000, 8], tf.bfloat16)
        dense = tf.compat.v1.get_variable("dense", [4], tf.bfloat16)
        rows = tf.IndexedSlices(tf.ones([3, 8], tf.bfloat16), tf.constant([1, 5, 7]),
                                tf.constant([1000, 8]))
        out = collective.allreduce_gradients(
            [(rows, table), (tf.ones([4], tf.bfloat16), dense)], spec)
    return graph, out


def test_bfloat16_goes_over_nccl_as_float32_reduced_and_float16_gathered():
    graph, out = _bf16_graph(gpu_spec())
    # NCCL carries no bfloat16: the dense bucket is reduced in float32, the
    # sparse rows (indices bitcast in) gathered as the same bits in float16.
    assert _collective_inputs(graph) == {"CollectiveReduceV2": tf.float32,
                                         "CollectiveGatherV2": tf.float16}
    assert isinstance(out[0][0], tf.IndexedSlices) and out[0][0].values.dtype == tf.bfloat16
    assert out[1][0].dtype == tf.bfloat16
    for op in graph.get_operations():
        if op.type.startswith("Collective"):
            assert op.device == "/job:worker/replica:0/task:0/device:GPU:0", op.device


def test_bfloat16_is_reduced_as_is_on_the_ring_and_gathered_as_float16():
    # CollectiveGatherV2 takes no bfloat16 on any transport (a bfloat16
    # embedding's sparse gradient failed to build before).
    graph, _ = _bf16_graph(collective.GroupSpec(TWO_RANKS, 0, communication_hint="ring",
                                                dense_mean="allreduce"))
    assert _collective_inputs(graph) == {"CollectiveReduceV2": tf.bfloat16,
                                         "CollectiveGatherV2": tf.float16}
    assert all(op.device == "/job:worker/replica:0/task:0" for op in graph.get_operations()
               if op.type.startswith("Collective"))
    # Two ranks on the ring take a dense mean by gathering: float16 bits too.
    graph, out = _bf16_graph(collective.GroupSpec(TWO_RANKS, 0, communication_hint="ring"))
    assert _collective_inputs(graph) == {"CollectiveGatherV2": tf.float16}
    assert out[1][0].dtype == tf.bfloat16


def test_a_dtype_nccl_cannot_carry_is_one_line():
    graph = tf.Graph()
    with graph.as_default():
        v = tf.compat.v1.get_variable("v", [4], tf.float32)
        with pytest.raises(ConfigError, match=r"^model: a int8 gradient or state cannot "
                                              r"go over NCCL"):
            collective.allreduce_gradients([(tf.ones([4], tf.int8), v)], gpu_spec())


# ------------------------------------------------------ session and actors


def test_worker_session_config_soft_places_and_grows_gpu_memory():
    config = collective.session_config(gpu_spec(1))
    assert config.allow_soft_placement
    assert config.gpu_options.allow_growth
    assert list(config.device_filters) == ["/job:worker/task:1"]


def test_actors_without_a_gpu_get_a_cpu_only_session_and_keep_this_process_alone():
    base = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=3,
                                    device_count={"CPU": 4})
    config = devices.cpu_only(base)
    assert config.device_count["GPU"] == 0 and config.device_count["CPU"] == 4
    assert config.inter_op_parallelism_threads == 3
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices.hide_gpus()  # not a Ray actor: this process's GPUs are not ours to hide
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


def test_an_actor_on_a_share_of_a_core_sleeps_its_idle_threads():
    """Below one CPU an actor shares its core, so TF's idle threads do not
    spin; from one CPU up TF's default stays. The worker's and the server's
    Session and TF server are built from this config, with the collective
    and device settings copied on top."""
    shared = devices.thread_config(1, 2, 0.5)
    assert shared.experimental.disable_thread_spinning
    assert (shared.intra_op_parallelism_threads, shared.inter_op_parallelism_threads) \
        == (1, 2)
    assert devices.cpu_only(shared).experimental.disable_thread_spinning
    assert collective.session_config(gpu_spec(0), shared).experimental \
        .disable_thread_spinning
    assert not devices.thread_config(4, 2, 4).experimental.disable_thread_spinning
    assert not devices.thread_config(1, 2, 1).experimental.disable_thread_spinning


# ----------------------------------- a declared GPU TensorFlow cannot see


CONFIG = f"""model: {MLP}
input: distributed.examples.digits:digits_input_fn
steps: 20
cpus_per_worker: 0.5
checkpoint: {{serving_every: 10, full_every: 20}}
"""


@pytest.fixture(scope="module")
def gpu_head():
    from tests.helpers.ray_head import local_ray_head
    with local_ray_head(num_cpus=4, extra_args=["--num-gpus=1"]) as head:
        yield head


def _train(head, tmp_path, gpus: float, workers: int) -> tuple[int, list[str]]:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG + f"gpus_per_worker: {gpus}\nworkers: {workers}\n")
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    env.pop("DTR_VERBOSE", None)
    out = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", str(path),
         "--storage", str(tmp_path / "storage"), "--run", "gpu"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return out.returncode, lines


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("gpus,workers,expected", [
    (0.5, 2, r"^error: gpus_per_worker: 0\.5 with 2 workers would put two workers on "
             r"one GPU"),
    (1, 1, r"^error: gpus_per_worker: 1, but TensorFlow on node \S+ \(.+\) sees no GPU "
           r"\(Ray gave it CUDA_VISIBLE_DEVICES=0\); install TensorFlow's CUDA build "
           r"there \(pip install 'distributed-tf-ray\[gpu\]'"),
], ids=["half-a-gpu-x2", "one-gpu-x1"])
def test_a_node_whose_tensorflow_sees_no_declared_gpu_fails_in_one_line(
        gpu_head, tmp_path, gpus, workers, expected):
    import re
    code, lines = _train(gpu_head, tmp_path, gpus, workers)
    print("\n".join(["", f"exit {code}:"] + lines))
    assert code == 2, lines
    assert len(lines) <= 3, lines
    assert not any("Traceback" in line for line in lines), lines
    assert any(re.search(expected, line) for line in lines), lines
    storage = tmp_path / "storage"
    assert not storage.exists() or not any(storage.iterdir()), list(storage.rglob("*"))


# ------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.slow
def test_the_smoke_script_passes_on_a_gpu():
    """Every check of ``scripts/gpu_smoke.py`` on its GPU path (NCCL needs 2 GPUs)."""
    from tests.helpers.gpus import gpus_visible
    if gpus_visible() == 0:
        pytest.skip("no GPU visible to TensorFlow (the CPU path runs in CI: "
                    "python scripts/gpu_smoke.py)")
    out = subprocess.run([sys.executable, os.path.join("scripts", "gpu_smoke.py")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "FAIL" not in out.stdout
