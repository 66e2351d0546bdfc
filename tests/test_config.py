"""The training config: defaults, YAML with overrides, and bad configs as a table.

Fast: no Ray, no TF. The CLI cases run ``python -m jobs.train`` in a
subprocess, which fails on the config before it starts Ray.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from distributed import config as config_lib
from distributed.checkpoint import KeepBestN, KeepLastN, Retention, SelectionSpec
from distributed.config import TrainConfig
from distributed.errors import ConfigError, DistributedError, SelectionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "jobs", "configs")


def test_defaults_validate():
    config = TrainConfig().validate()
    assert config == config_lib.from_dict({}) == config_lib.from_dict(None)
    assert config.model == "distributed.examples.digits:cnn_bn_model_fn"
    assert config.selection == SelectionSpec("inference")
    assert config.retention == {"serving": Retention((KeepLastN(5),)),
                                "full": Retention((KeepLastN(2),))}
    assert config.storage_path == os.path.abspath("runs")


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_shipped_configs_validate(name):
    config_lib.load(os.path.join(CONFIGS, name))


def test_load_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": "distributed.examples.digits:mlp_model_fn",
        "optimizer": {"name": "momentum", "learning_rate": 0.05},
        "steps": 1000, "workers": 2, "run": "from-yaml",
        "checkpoint": {"serving_every": 200, "shards": 3, "on_busy": "skip"},
        "retention": {"serving": {"keep_last": 3,
                                  "keep_best": {"n": 1, "metric": "loss"}}},
    }))
    config = config_lib.load(str(path), {"steps": 50, "workers": 3, "run": None,
                                         "storage": f"file://{tmp_path}/store"})
    assert (config.steps, config.workers) == (50, 3)  # overridden
    assert config.run == "from-yaml"  # a None override leaves the file's value
    assert config.model == "distributed.examples.digits:mlp_model_fn"
    assert config.optimizer.name == "momentum"
    assert config.optimizer.learning_rate == 0.05
    assert config.optimizer.kwargs == {}  # momentum's 0.9 is the builder's default
    assert config.optimizer.clip_global_norm is None  # nested default kept
    assert config.checkpoint.serving_every == 200 and config.checkpoint.shards == 3
    assert config.checkpoint.on_busy == "skip"
    assert config.checkpoint.full_every == 500  # default
    assert config.storage_path == str(tmp_path / "store")
    assert config.retention == {"serving": Retention((KeepLastN(3), KeepBestN(1, "loss")))}
    # no full key: the trainer leaves that tier alone


def test_empty_yaml_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert config_lib.load(str(path)) == TrainConfig()


EVAL = {"input": "distributed.examples.digits:digits_eval_input_fn"}

# (case id, config data, field the message must start with, text it must also hold)
BAD = [
    ("unknown-key", {"stepz": 5}, "stepz", "unknown key"),
    ("unknown-nested-checkpoint", {"checkpoint": {"every": 10}}, "checkpoint.every",
     "serving_every"),
    ("unknown-selection-key", {"selection": {"policy": "all", "includes": []}},
     "selection", "includes"),
    ("unknown-retention-tier", {"retention": {"best": {"keep_last": 1}}},
     "retention", "best"),
    ("unknown-retention-rule", {"retention": {"full": {"keep_first": 1}}},
     "retention.full", "keep_first"),
    ("steps-string", {"steps": "100"}, "steps", "'100'"),
    ("steps-float", {"steps": 1e3}, "steps", "1000.0"),
    ("batch-size-float", {"batch_size": 1.5}, "batch_size", "1.5"),
    ("workers-bool", {"workers": True}, "workers", "True"),
    ("optimizer-not-mapping", {"optimizer": "adam"}, "optimizer", "mapping"),
    ("checkpoint-not-mapping", {"checkpoint": 5}, "checkpoint", "mapping"),
    ("learning-rate-string", {"optimizer": {"learning_rate": "fast"}},
     "optimizer.learning_rate", "'fast'"),
    ("model-params-list", {"model_params": [1, 2]}, "model_params", "mapping"),
    ("steps-zero", {"steps": 0}, "steps", "positive"),
    ("steps-negative", {"steps": -5}, "steps", "-5"),
    ("workers-zero", {"workers": 0}, "workers", "positive"),
    ("batch-size-negative", {"batch_size": -4}, "batch_size", "-4"),
    ("shards-zero", {"checkpoint": {"shards": 0}}, "checkpoint.shards", "positive"),
    ("serving-every-negative", {"checkpoint": {"serving_every": -1}},
     "checkpoint.serving_every", ">= 0"),
    ("log-every-zero", {"log_every": 0}, "log_every", "positive"),
    ("cpus-zero", {"cpus_per_worker": 0}, "cpus_per_worker", "positive"),
    ("gpus-negative", {"gpus_per_worker": -1}, "gpus_per_worker", ">= 0"),
    ("optimizer-schedule", {"optimizer": {"learning_rate": {"schedule": "linear"}}},
     "optimizer.learning_rate.schedule", "constant, piecewise, exponential"),
    ("optimizer-clip-negative", {"optimizer": {"clip_global_norm": -1}},
     "optimizer.clip_global_norm", "positive"),
    ("optimizer-function-ref", {"optimizer": "pkg.mod:"}, "optimizer",
     "package.module:function"),
    ("on-busy", {"checkpoint": {"on_busy": "drop"}}, "checkpoint.on_busy", "wait, skip"),
    ("selection-policy", {"selection": {"policy": "everything"}}, "selection.policy",
     "trainable, inference, all"),
    ("selection-regex", {"selection": {"include": ["cnn/(conv"]}},
     "selection.include[0]", "does not compile"),
    ("selection-exclude-regex", {"selection": {"exclude": ["*bn"]}},
     "selection.exclude[0]", "does not compile"),
    ("selection-include-string", {"selection": {"include": "^cnn/"}},
     "selection.include", "list"),
    ("selection-not-mapping", {"selection": "inference"}, "selection", "mapping"),
    ("retention-keep-last-zero", {"retention": {"serving": {"keep_last": 0}}},
     "retention.serving.keep_last", "positive"),
    ("retention-keep-best-mode", {"retention": {"full": {
        "keep_best": {"n": 1, "metric": "loss", "mode": "lowest"}}}},
     "retention.full.keep_best.mode", "min or max"),
    ("retention-keep-best-no-metric", {"retention": {"serving": {"keep_best": {"n": 2}}}},
     "retention.serving.keep_best", "metric"),
    ("storage-ftp", {"storage": "ftp://host/runs"}, "storage", "not supported"),
    ("storage-s3-no-bucket", {"storage": "s3:///runs"}, "storage", "names no bucket"),
    ("storage-empty", {"storage": ""}, "storage", "directory"),
    ("storage-blank", {"storage": "   "}, "storage", "directory"),
    ("storage-no-scheme", {"storage": "://x"}, "storage",
     "neither a directory path nor a URI"),
    ("storage-file-uri-relative", {"storage": "file://runs"}, "storage",
     "file:///abs/path"),
    ("unknown-key-suggestion", {"stepz": 5}, "stepz", "did you mean 'steps'?"),
    ("steps-quoted-number", {"steps": "100"}, "steps", "without quotes"),
    ("run-dotdot", {"run": "../escape"}, "run", "not valid"),
    ("run-slash", {"run": "a/b"}, "run", "not valid"),
    ("run-empty", {"run": ""}, "run", "not valid"),
    ("run-null", {"run": None}, "run", "string"),
    ("model-no-colon", {"model": "distributed.examples.digits.mlp_model_fn"}, "model",
     "package.module:function"),
    ("input-empty-function", {"input": "distributed.examples.digits:"}, "input",
     "package.module:function"),
    ("input-two-colons", {"input": "a:b:c"}, "input", "package.module:function"),
    ("learning-rate-zero", {"optimizer": {"learning_rate": 0}},
     "optimizer.learning_rate", "positive"),
    ("collective-timeout-zero", {"collective_timeout": 0}, "collective_timeout",
     "positive"),
    ("sparse-density-negative", {"sparse_density_threshold": -0.5},
     "sparse_density_threshold", "expected a number >= 0"),
    ("sparse-density-nan", {"sparse_density_threshold": float("nan")},
     "sparse_density_threshold", "expected a number >= 0"),
    ("unknown-selection-key-typo", {"selection": {"polcy": "all"}}, "selection", "polcy"),
    ("on-busy-typo", {"checkpoint": {"on_busy": "wiat"}}, "checkpoint.on_busy",
     "did you mean 'wait'? use one of wait, skip"),
    ("on-busy-not-a-string", {"checkpoint": {"on_busy": True}}, "checkpoint.on_busy",
     "True is not valid"),
    ("stop-when-mode", {"eval": {**EVAL, "stop_when": {"mode": "highest"}}},
     "eval.stop_when.mode", "use one of min, max"),
    ("optimizer-name-number", {"optimizer": {"name": 3}}, "optimizer.name", "string"),
    ("max-failures-negative", {"max_failures": -1}, "max_failures", ">= 0"),
]


@pytest.mark.parametrize("data,field,detail", [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_config_names_the_field(data, field, detail):
    with pytest.raises(ConfigError) as info:
        config_lib.from_dict(data)
    message = str(info.value)
    assert re.match(rf"{re.escape(field)}(?![\w.\[])", message), message
    assert detail in message, message
    assert "\n" not in message


# A retention tier that is not a mapping must be a ConfigError (one line from
# jobs.train), not a builtin error with a traceback.
BAD_RETENTION_TIER = [
    pytest.param({"retention": {"serving": 5}}, id="retention-tier-int"),
    pytest.param({"retention": {"full": "keep_last"}}, id="retention-tier-string"),
]


@pytest.mark.parametrize("data", BAD_RETENTION_TIER)
def test_retention_tier_that_is_not_a_mapping(data):
    tier = next(iter(data["retention"]))
    with pytest.raises(ConfigError, match=rf"^retention\.{tier}\b"):
        config_lib.from_dict(data)


def test_selection_errors_are_config_errors():
    # SelectionError is a ConfigError, so one `except ConfigError` catches both.
    with pytest.raises(SelectionError):
        config_lib.from_dict({"selection": {"policy": "nope"}})
    assert issubclass(SelectionError, ConfigError)
    assert issubclass(ConfigError, (DistributedError, ValueError))


def test_to_dict_round_trips_through_json_in_the_recorded_form():
    """The actors and run_config.json get the config as plain data; it must
    come back equal, with selection and retention in their YAML form."""
    config = config_lib.from_dict({
        "optimizer": {"name": "adam", "ema_decay": 0.99},
        "selection": {"policy": "trainable", "include": ["^cnn/"], "serve_ema": True},
        "retention": {"serving": {"keep_last": 3, "keep_every": 100, "keep_best": {
            "n": 2, "metric": "eval/loss", "mode": "max"}}, "full": None},
        "checkpoint": {"on_busy": "skip"},
        "eval": {**EVAL, "stop_when": {"metric": "eval/loss", "mode": "max"}}})
    data = json.loads(json.dumps(config.to_dict()))
    assert config_lib.from_dict(data) == config
    assert data["selection"] == {"policy": "trainable", "include": ["^cnn/"],
                                 "exclude": [], "serve_ema": True}
    assert data["retention"] == {"serving": {
        "keep_last": 3, "keep_every": 100,
        "keep_best": {"n": 2, "metric": "eval/loss", "mode": "max"}}, "full": {}}
    assert data["checkpoint"]["on_busy"] == "skip"


def test_null_selection_and_retention_keep_their_meaning():
    config = config_lib.from_dict({"selection": None, "retention": None})
    assert config.selection == SelectionSpec()  # the spec's defaults: trainable
    assert config.retention == {}  # no tier: the trainer deletes nothing


def test_metric_uses_names_each_field_that_names_a_metric():
    config = config_lib.from_dict({
        "eval": {**EVAL, "stop_when": {"metric": "eval/auc", "mode": "max"}},
        "retention": {"full": {"keep_last": 1},
                      "serving": {"keep_best": {"metric": "eval/loss"}}}})
    assert config.metric_uses() == [("eval.stop_when.metric", "eval/auc"),
                                    ("retention.serving.keep_best.metric", "eval/loss")]
    assert config_lib.from_dict({}).metric_uses() == []


def test_storage_file_uri_is_accepted(tmp_path):
    config = config_lib.from_dict({"storage": f"file://{tmp_path}"})
    assert config.storage_path == str(tmp_path)


# --------------------------------------------------------------- files -----

def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="does not exist") as info:
        config_lib.load(path)
    assert path in str(info.value)


def test_config_file_that_is_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: [1, 2\nworkers: {\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        config_lib.load(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text,kind", [("- steps: 10\n- workers: 2\n", "list"),
                                       ("just a string\n", "str"),
                                       ("42\n", "int")])
def test_config_file_that_is_not_a_mapping(tmp_path, text, kind):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"must hold a mapping.*got {kind}") as info:
        config_lib.load(str(path))
    assert str(path) in str(info.value)


def test_bad_field_in_file_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("checkpoint:\n  on_busy: later\n")
    with pytest.raises(ConfigError, match=r"^checkpoint\.on_busy: 'later'"):
        config_lib.load(str(path))


def test_override_is_validated_too(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("steps: 10\n")
    with pytest.raises(ConfigError, match="^workers: expected a positive integer"):
        config_lib.load(str(path), {"workers": 0})


# ----------------------------------------------------------------- CLI -----

def _run_cli(args, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


CLI_CASES = [
    pytest.param("model: distributed.examples.digits:mlp_model_fn\nstepz: 10\n", [],
                 "stepz", id="unknown-key"),
    pytest.param("optimizer: {learning_rate: {schedule: cosin}}\n", [],
                 "optimizer.learning_rate.schedule: 'cosin' is not valid; did you mean "
                 "'cosine'?", id="optimizer"),
    pytest.param("selection: {include: ['(']}\n", [], "selection.include[0]",
                 id="selection-regex"),
    pytest.param("steps: 10\n", ["--workers", "0"], "workers", id="override"),
    pytest.param("- steps: 10\n", [], "must hold a mapping", id="yaml-list"),
    pytest.param("steps: [10\n", [], "not valid YAML", id="not-yaml"),
    pytest.param("retention: {serving: 5}\n", [], "retention.serving",
                 id="retention-tier-int"),
]


@pytest.mark.parametrize("text,extra,expected", CLI_CASES)
def test_cli_bad_config_exits_2_with_one_line(tmp_path, text, extra, expected):
    storage = tmp_path / "storage"
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = _run_cli(["--config", str(path), "--storage", str(storage),
                     "--run", "cli-bad", *extra], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]
    assert proc.stdout == ""
    assert not storage.exists()  # nothing written, not even the run directory


def test_cli_missing_config_file(tmp_path):
    storage = tmp_path / "storage"
    proc = _run_cli(["--config", str(tmp_path / "missing.yaml"),
                     "--storage", str(storage)], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: config file {str(tmp_path / 'missing.yaml')!r} does not exist"]
    assert not storage.exists()
