"""Config validation (a table of bad inputs) and the checkpoint policies."""

import os
import subprocess
import sys

import pytest

from distributed import config as config_lib
from distributed.errors import ConfigError
from distributed.train.schedule import BusyPolicy, CheckpointSchedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_validate():
    c = config_lib.from_dict({})
    assert c.workers == 2 and c.selection_spec().policy == "inference"
    assert c.model.endswith(":cnn_bn_model_fn")


@pytest.mark.parametrize("data, fragment", [
    ({"stepz": 5}, "stepz: unknown key"),
    ({"optimizer": {"lr": 0.1}}, "optimizer.lr: unknown key"),
    ({"checkpoint": {"every": 3}}, "checkpoint.every: unknown key"),
    ({"steps": 0}, "steps: expected a positive integer, got 0"),
    ({"steps": -5}, "steps: expected a positive integer"),
    ({"steps": "ten"}, "steps: expected an integer, got 'ten'"),
    ({"workers": 0}, "workers: expected a positive integer"),
    ({"workers": 1.5}, "workers: expected an integer"),
    ({"batch_size": True}, "batch_size: expected an integer"),
    ({"checkpoint": {"shards": 0}}, "checkpoint.shards: expected a positive integer"),
    ({"checkpoint": {"serving_every": -1}}, "checkpoint.serving_every: expected an integer >= 0"),
    ({"checkpoint": {"on_busy": "queue"}}, "checkpoint.on_busy: 'queue' is not valid"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name: 'rmsprop' is not valid"),
    ({"optimizer": {"learning_rate": 0}}, "optimizer.learning_rate: expected a positive number"),
    ({"optimizer": {"name": "momentum", "momentum": 1.5}}, "optimizer.momentum"),
    ({"optimizer": "adam"}, "optimizer: expected a mapping"),
    ({"selection": {"include": ["("]}}, "selection.include[0]: regex '(' does not compile"),
    ({"selection": {"policy": "everything"}}, "selection.policy: 'everything' is not a policy"),
    ({"selection": {"polcy": "all"}}, "unknown key(s) ['polcy']"),
    ({"retention": {"serving": {"keep_last": 0}}}, "retention.serving.keep_last"),
    ({"retention": {"archive": {}}}, "retention: unknown tier(s) ['archive']"),
    ({"storage": "s3://bucket/runs"}, "storage: 's3://bucket/runs' is not supported yet"),
    ({"storage": ""}, "storage: expected a directory path"),
    ({"run": "a/b"}, "run: run name 'a/b' is not valid"),
    ({"model": "no_colon"}, "model: expected 'package.module:function'"),
    ({"input": "a:b:c"}, "input: expected 'package.module:function'"),
    ({"gpus_per_worker": -1}, "gpus_per_worker: expected >= 0"),
    ({"cpus_per_worker": 0}, "cpus_per_worker: expected a positive number"),
    ({"collective_timeout": 0}, "collective_timeout: expected a positive number"),
    ({"model_params": [1, 2]}, "model_params: expected a mapping"),
])
def test_bad_config_names_the_field(data, fragment):
    with pytest.raises(ConfigError) as info:
        config_lib.from_dict(data)
    assert fragment in str(info.value)


def test_load_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 100\nworkers: 3\nrun: a\n")
    c = config_lib.load(str(path), {"steps": 7, "run": None})
    assert (c.steps, c.workers, c.run) == (7, 3, "a")


@pytest.mark.parametrize("text, fragment", [
    (None, "does not exist"),
    ("steps: [1\n", "is not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
])
def test_bad_config_files(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        config_lib.load(str(path))


def test_shipped_configs_validate():
    configs = os.path.join(REPO, "jobs", "configs")
    for name in os.listdir(configs):
        config_lib.load(os.path.join(configs, name))


@pytest.mark.slow
def test_cli_bad_config_is_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"steps: 0\nstorage: {tmp_path / 'store'}\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: steps: expected a positive integer, got 0"
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("serving, full, last, step, due", [
    (100, 500, 1000, 100, ("serving",)),
    (100, 500, 1000, 500, ("full", "serving")),
    (100, 500, 1000, 150, ()),
    (100, 500, 1000, 1000, ("full", "serving")),
    (0, 0, 1000, 500, ()),
    (0, 0, 1000, 1000, ("full", "serving")),
    (30, 0, 95, 90, ("serving",)),
    (30, 0, 95, 95, ("full", "serving")),
])
def test_schedule(serving, full, last, step, due):
    assert CheckpointSchedule(serving, full, last).due(step) == due


@pytest.mark.parametrize("mode, in_flight, final, decision", [
    ("wait", False, False, "go"),
    ("wait", True, False, "wait"),
    ("skip", True, False, "skip"),
    ("skip", True, True, "wait"),
    ("skip", False, False, "go"),
])
def test_busy_policy(mode, in_flight, final, decision):
    assert BusyPolicy(mode).decide(in_flight, final) == decision
