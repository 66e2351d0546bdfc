"""A multi-node Ray simulated on this machine (``ray.cluster_utils.Cluster``),
for the tests that place actors on nodes of their own."""

from __future__ import annotations

import contextlib
import os

import ray

from tests.conftest import REPO_ROOT


@contextlib.contextmanager
def simulated_cluster(head_cpus: float, node_cpus: float, nodes: int,
                      node_resources: dict | None = None):
    """A head and ``nodes`` more nodes on this machine (``ray.cluster_utils``),
    with token authentication on: the GCS and every raylet get
    ``RAY_AUTH_MODE=token`` and the session's ``RAY_AUTH_TOKEN`` (conftest)
    from this process's environment, and this process re-reads its Ray config
    so its own GCS client and the driver send the token too. ``node_resources``:
    Ray custom resources each added node offers (e.g. ``{"ps_node": 4}``). The driver is
    connected (to the head's raylet). Everything is shut down and the
    environment, the Ray config and Ray's address file restored on exit, even
    on failure."""
    from ray._common.utils import get_ray_address_file
    from ray._raylet import Config
    from ray.cluster_utils import Cluster

    from tests.conftest import stop_shared_ray
    stop_shared_ray()  # the local Ray modules share (tests/conftest.py)
    assert not ray.is_initialized(), "a Ray is already running in this process"
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    assert os.environ.get("RAY_AUTH_TOKEN"), "tests/conftest.py sets the token"
    address_file = get_ray_address_file(None)  # Cluster writes, then deletes it
    saved_address = (open(address_file).read() if os.path.exists(address_file)
                     else None)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # what ray.init does when it enables token auth
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "include_dashboard": False})
        for _ in range(nodes):
            cluster.add_node(num_cpus=node_cpus, resources=node_resources or {})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": REPO_ROOT,
                                           "TF_CPP_MIN_LOG_LEVEL": "2"}})
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        Config.initialize("")
        if saved_address is not None:
            with open(address_file, "w") as f:
                f.write(saved_address)
