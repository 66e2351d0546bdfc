"""cluster.yaml is a valid Ray cluster-launcher config, set up the way this project needs.

Offline by design: Ray's JSON schema, then the provider-independent half of
`ray up` (`prepare_config` then `validate_config`, exactly what
`ray.autoscaler._private.commands._bootstrap_config` runs before it talks to the
cloud). The AWS half (`fillout_available_node_types_resources`, which calls
DescribeInstanceTypes, and `bootstrap_aws`: IAM role, key pair, subnets, security
groups) needs credentials and is not run; node resources are written out in the
file so nothing depends on it.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
SHARED_MOUNT = "/mnt/shared"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _home(config: dict) -> str:
    return f"/home/{config['auth']['ssh_user']}"


def _expand(command: str, config: dict) -> str:
    return command.replace("~/", _home(config) + "/")


def _worker_types(config: dict) -> dict:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


def test_matches_ray_schema(raw, schema):
    jsonschema.validate(raw, schema)


def test_schema_rejects_a_typo(raw, schema):
    """The schema does bite: node types forbid unknown keys."""
    bad = copy.deepcopy(raw)
    node_type = next(iter(_worker_types(bad).values()))
    node_type["resource"] = node_type.pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_prepare_and_validate_config(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # Filled in from Ray's AWS defaults by prepare_config.
    assert "cluster_synced_files" in prepared


def test_gpu_worker_type(prepared):
    gpu_types = {
        k: v for k, v in _worker_types(prepared).items() if v["resources"].get("GPU", 0) >= 1
    }
    assert gpu_types, "no worker node type with resources GPU >= 1"
    for name, node_type in gpu_types.items():
        lo, hi = node_type["min_workers"], node_type["max_workers"]
        assert 0 <= lo <= hi <= prepared["max_workers"], name
        assert node_type["max_workers"] >= 1, name
        assert node_type["node_config"]["InstanceType"], name


def test_head_is_cpu_only(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) >= 1  # runs the Coordinator and the driver
    assert head["max_workers"] == 0


def test_setup_installs_the_synced_project(prepared):
    repo_mounts = [r for r, local in prepared["file_mounts"].items() if local in (".", "./")]
    assert repo_mounts, "the working copy is not in file_mounts"
    repo_remote = repo_mounts[0]
    assert ".venv" in prepared["rsync_exclude"]
    # prepare_config merged setup_commands into both node kinds' lists.
    for kind in ("head_setup_commands", "worker_setup_commands"):
        commands = [_expand(c, prepared) for c in prepared[kind]]
        pattern = rf"pip install .*{re.escape(repo_remote)}(\s|$)"
        assert any(re.search(pattern, c) for c in commands), kind


def test_shared_storage_mounted_on_every_node(prepared):
    for kind in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[kind]
        assert any("mount -t nfs4" in c and SHARED_MOUNT in c for c in commands), kind


def test_token_auth_on_every_node(prepared):
    remote_token = [r for r in prepared["file_mounts"] if r.endswith("/.ray/auth_token")]
    assert remote_token == [f"{_home(prepared)}/.ray/auth_token"]
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[kind] if "ray start" in c]
        assert starts, kind
        assert all("RAY_AUTH_MODE=token" in c for c in starts), kind


def test_dashboard_only_on_loopback(prepared):
    (start,) = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start
