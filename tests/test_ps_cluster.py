"""Parameter servers on a node of their own (a Ray custom resource), on a
multi-node Ray simulated on this machine, with one server killed mid-run: the
group (workers, coordinator and servers) restarts from the last full
checkpoint and finishes, as after a dead worker."""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest
import ray

from distributed.train import trainer
from tests.helpers.ps import TABLE, checkpoint_values, wide_deep_config
from tests.helpers.ray_cluster import simulated_cluster


def _own_servers() -> list[psutil.Process]:
    """This test's live ``ParameterServer`` actor processes, by their process
    title (Ray names an actor's process ``ray::<class>``), among this test
    process's descendants only."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith("ray::ParameterServer"):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
@pytest.mark.ray
def test_servers_on_their_own_node_survive_a_killed_server(tmp_path):
    storage = str(tmp_path)
    config = wide_deep_config(
        storage, "ps-cluster", parameter_servers=2, ps_cpus=0.5,
        ps_resources={"ps_node": 1}, steps=120, log_every=20, max_failures=2,
        checkpoint={"serving_every": 40, "full_every": 40})
    lines: list[str] = []
    killed: list[int] = []
    errors: list[BaseException] = []

    def kill_a_server():
        try:
            servers = _own_servers()
            assert len(servers) == 2, [p.cmdline() for p in servers]
            killed.append(servers[0].pid)
            os.kill(servers[0].pid, signal.SIGKILL)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    def echo(line: str):
        lines.append(line)
        if not killed and "committed full checkpoint at step 40" in line:
            thread = threading.Thread(target=kill_a_server, daemon=True)
            thread.start()
            thread.join(30)

    # The head holds the coordinator and the workers; the servers can only go
    # to the other node, the one that has the ps_node resource.
    with simulated_cluster(head_cpus=2, node_cpus=2, nodes=1,
                           node_resources={"ps_node": 2}):
        head = [n for n in ray.nodes() if n["Alive"] and "ps_node" not in n["Resources"]]
        assert head, ray.nodes()
        summary = trainer.train(config, echo=echo)
    assert not errors, errors
    assert killed, lines
    assert summary["steps"] == 120, lines
    restarts = [line for line in lines if line.startswith("restarted: resuming from")]
    assert len(restarts) == 1, lines
    failures = [line for line in lines if line.startswith("FAILURE")]
    assert len(failures) == 1 and "parameter server" in failures[0] \
        and "died" in failures[0], lines
    table = checkpoint_values(storage, "ps-cluster", "full", 120)[TABLE]
    assert table.shape == (20_000, 8)
