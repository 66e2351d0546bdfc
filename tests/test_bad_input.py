"""Bad input, as a table: every user mistake is one readable error, exit 2.

Each case runs an entry point in-process (``main_guard(lambda: main(argv))``,
as ``python -m jobs.train``/``jobs.restore`` do) and checks: a non-zero exit,
a message that names the bad key, flag or value and says how to fix it, no
Python traceback, nothing on stdout, and nothing written (the storage
directory stays empty, no export directory appears).

The fast table must fail before Ray starts: ``connect_ray`` is replaced by one
that fails the test. The slow table needs a real local Ray (more GPUs than
the cluster has, a ``model_fn`` that raises, a loss that becomes NaN).
"""

from __future__ import annotations

import json
import os
import re
import traceback

import pytest

import jobs.restore
import jobs.train
from distributed.cli.guard import main_guard
from distributed.config import TrainConfig
from distributed.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = "tests.test_bad_input"
PYTHON_TRACEBACK = "Traceback (most recent call last)"

# ------------------------------------------------- functions cases name -----


def three_arg_model_fn(features, labels, mode):
    """A ``model_fn`` that forgot ``params``."""


def five_arg_input_fn(worker_index, num_workers, batch_size, params, extra):
    """An ``input_fn`` with one parameter too many."""


def raising_model_fn(features, labels, mode, params):
    """A ``model_fn`` with a bug: the user must see this frame, once."""
    raise ValueError("boom from raising_model_fn")


NOT_A_FUNCTION = 42


def _digits_dataset(features_of):
    import numpy as np
    import tensorflow as tf
    x = np.zeros((64, 64), np.float32)
    return tf.data.Dataset.from_tensor_slices((features_of(x), np.zeros(64, np.int64)))


def unpaired_input_fn(worker_index, num_workers, batch_size, params):
    """A dataset of bare tensors, not (features dict, labels) pairs."""
    import tensorflow as tf
    return tf.data.Dataset.range(1000).batch(batch_size).repeat()


def unknown_rank_input_fn(worker_index, num_workers, batch_size, params):
    """A generator dataset that declares no shape for its feature."""
    import tensorflow as tf
    return tf.data.Dataset.from_generator(
        lambda: iter([]), output_signature=(
            {"image": tf.TensorSpec(None, tf.float32)},
            tf.TensorSpec([None], tf.int64))).repeat()


def per_worker_shape_input_fn(worker_index, num_workers, batch_size, params):
    """Worker 1's images are half as wide as worker 0's."""
    width = 64 if worker_index == 0 else 32
    return _digits_dataset(lambda x: {"image": x[:, :width]}).repeat().batch(batch_size)


def ending_input_fn(worker_index, num_workers, batch_size, params):
    """Ends after a few batches; a filter hides its length from the probe."""
    return _digits_dataset(lambda x: {"image": x}).filter(
        lambda f, y: True).batch(batch_size)


def list_ray_dataset(params):
    return [{"image": [0.0] * 64, "label": 1}]


def empty_ray_dataset(params):
    import ray.data
    return ray.data.from_items([])


def digits_ray_dataset(params):
    import numpy as np
    import ray.data
    return ray.data.from_items([{"image": np.zeros(64, np.float32), "label": 1}] * 64)

# ------------------------------------------------------------ the table -----

# A case names files to write into its tmp dir first; "{tmp}" in them and in
# argv becomes that dir. Storage is <tmp>/storage, created empty.
CONFIG = "config.yaml"
STORAGE = ("--storage", "{tmp}/storage", "--run", "bad-input")
EMPTY_RUN = "storage/empty-run/run_config.json"
EMPTY_RUN_RECORD = json.dumps({
    "config": {**TrainConfig(run="empty-run").to_dict(), "storage": "{tmp}/storage"},
    "input_spec": {"features": {"image": ["float32", [64]]}, "labels": ["int64", []]}})
RESTORE = ("--storage", "{tmp}/storage", "--export", "{tmp}/export")

# Output kinds: "line": exactly one line "error: ..." (a DistributedError);
# "usage": argparse's usage and "python -m jobs.X: error: ..." (exit 2);
# "user": "error: ..." then the user's own traceback, none of our frames.
LINE, USER = "line", "user"


def train_yaml(case_id, text, pattern, *argv, kind=LINE):
    """A ``jobs.train --config`` case; storage and run are added unless the
    YAML sets them (command-line values would override the file's)."""
    store = () if re.search(r"^(storage|run):", text, re.M) else STORAGE
    return pytest.param("train", {CONFIG: text}, ["--config", "{tmp}/" + CONFIG,
                                                  *argv, *store],
                        kind, pattern, id=case_id)


def train_cli(case_id, argv, pattern, kind=LINE, files=None):
    return pytest.param("train", files or {}, list(argv), kind, pattern, id=case_id)


def restore(case_id, argv, pattern, kind=LINE, files=None):
    return pytest.param("restore", files or {}, list(argv), kind, pattern, id=case_id)


CASES = [
    # -- config file: unknown keys (a typo must not fall back to a default)
    train_yaml("unknown-top-level-key", "stepz: 10\n",
               r"stepz: unknown key; did you mean 'steps'\?"),
    train_yaml("unknown-optimizer-key", "optimizer: {name: adam, lr: 0.1}\n",
               r"optimizer\.lr: unknown key.*learning_rate"),
    train_yaml("unknown-checkpoint-key", "checkpoint: {every: 10}\n",
               r"checkpoint\.every: unknown key.*serving_every"),
    train_yaml("unknown-selection-key", "selection: {policy: all, includes: [x]}\n",
               r"selection: unknown key.*'includes'.*valid keys are policy, include, "
               r"exclude"),
    train_yaml("unknown-retention-rule", "retention: {full: {keep_first: 1}}\n",
               r"retention\.full: unknown key.*'keep_first'.*keep_last"),
    train_yaml("unknown-retention-tier", "retention: {best: {keep_last: 1}}\n",
               r"retention: unknown tier.*'best'.*serving and/or full"),
    # -- wrong types
    train_yaml("steps-string", "steps: '100'\n",
               r"steps: expected an integer, got '100'.*without quotes"),
    train_yaml("workers-list", "workers: [1, 2]\n",
               r"workers: expected an integer, got \[1, 2\]"),
    train_yaml("batch-size-bool", "batch_size: true\n",
               r"batch_size: expected an integer, got True"),
    train_yaml("learning-rate-string", "optimizer: {learning_rate: fast}\n",
               r"optimizer\.learning_rate: expected a number, got 'fast'"),
    train_yaml("optimizer-not-mapping", "optimizer: adam\n",
               r"optimizer: expected a mapping such as \{name: adam, learning_rate: "
               r"0\.001\} or a 'package\.module:function' string, got 'adam'"),
    # -- zero and negative numbers
    train_yaml("steps-zero", "steps: 0\n", r"steps: expected a positive integer, got 0"),
    train_yaml("steps-negative", "steps: -5\n",
               r"steps: expected a positive integer, got -5"),
    train_yaml("workers-zero", "workers: 0\n",
               r"workers: expected a positive integer, got 0"),
    train_yaml("batch-size-negative", "batch_size: -32\n",
               r"batch_size: expected a positive integer, got -32"),
    train_yaml("shards-zero", "checkpoint: {shards: 0}\n",
               r"checkpoint\.shards: expected a positive integer, got 0"),
    train_yaml("serving-every-negative", "checkpoint: {serving_every: -10}\n",
               r"checkpoint\.serving_every: expected an integer >= 0, got -10"),
    train_yaml("learning-rate-zero", "optimizer: {learning_rate: 0}\n",
               r"optimizer\.learning_rate: expected a positive number, got 0"),
    train_yaml("learning-rate-negative", "optimizer: {learning_rate: -0.1}\n",
               r"optimizer\.learning_rate: expected a positive number, got -0\.1"),
    train_yaml("collective-timeout-negative", "collective_timeout: -1\n",
               r"collective_timeout: expected a positive number, got -1"),
    # -- bad choices
    train_yaml("optimizer-unknown", "optimizer: {name: rmsprob}\n",
               r"optimizer\.name: 'rmsprob' is not valid; did you mean 'rmsprop'\? use "
               r"one of adadelta, adagrad, adagrad_da, adam, .*, rmsprop, sgd or "
               r"'package\.module:function'"),
    train_yaml("optimizer-unknown-kwarg", "optimizer: {name: rmsprop, decy: 0.9}\n",
               r"optimizer\.decy: unknown key for rmsprop \(RMSPropOptimizer\); did you "
               r"mean 'decay'\? valid keys are .*decay, momentum, epsilon"),
    train_yaml("optimizer-unknown-schedule",
               "optimizer: {learning_rate: {schedule: cosin, initial: 0.1}}\n",
               r"optimizer\.learning_rate\.schedule: 'cosin' is not valid; did you "
               r"mean 'cosine'\? use one of constant, piecewise, exponential, cosine, "
               r"polynomial"),
    train_yaml("optimizer-unknown-schedule-key",
               "optimizer: {learning_rate: {schedule: exponential, initial: 0.1, "
               "decay_steps: 100, decay_rat: 0.5}}\n",
               r"optimizer\.learning_rate\.decay_rat: unknown key for the exponential "
               r"schedule \(exponential_decay\); did you mean 'decay_rate'\?"),
    train_yaml("optimizer-function-not-importable",
               "optimizer: no_such_module_xyz.opts:make_optimizer\n",
               r"optimizer: cannot import module 'no_such_module_xyz\.opts' .*check "
               r"the spelling.*PYTHONPATH"),
    train_yaml("selection-policy-unknown", "selection: {policy: everything}\n",
               r"selection\.policy: .*'everything'.*trainable, inference, all"),
    train_yaml("selection-regex", "selection: {include: ['cnn/(conv']}\n",
               r"selection\.include\[0\]: regex 'cnn/\(conv' does not compile.*"
               r"Escape"),
    train_yaml("keep-best-mode", "retention: {serving: {keep_best: {metric: loss, "
               "mode: lowest}}}\n",
               r"retention\.serving\.keep_best\.mode: 'lowest' is not valid; use min "
               r"or max"),
    # -- the config file itself
    train_yaml("yaml-invalid", "steps: [10\nworkers: 2\n",
               r"config file '.*config\.yaml' is not valid YAML at line \d+, column "
               r"\d+"),
    train_yaml("yaml-not-mapping", "- steps: 10\n- workers: 2\n",
               r"config file '.*config\.yaml' must hold a mapping of fields, got list"),
    train_cli("config-file-missing", ["--config", "{tmp}/nope.yaml", *STORAGE],
              r"config file '.*nope\.yaml' does not exist"),
    # -- model and input functions
    train_yaml("model-no-colon", "model: distributed.examples.digits.mlp_model_fn\n",
               r"model: expected 'package\.module:function', got "
               r"'distributed\.examples\.digits\.mlp_model_fn'; write .* a colon"),
    train_yaml("input-two-colons", "input: a:b:c\n",
               r"input: expected 'package\.module:function', got 'a:b:c'"),
    train_yaml("model-module-missing", "model: distributed.exampels.digits:mlp_model_fn\n",
               r"model: cannot import module 'distributed\.exampels\.digits' .*check "
               r"the spelling.*PYTHONPATH"),
    train_yaml("model-module-missing-dependency", "model: bad_dep_module:model_fn\n",
               r"model: module 'bad_dep_module' imports 'no_such_dependency_xyz', "
               r"which is not installed; install it"),
    train_yaml("model-module-raises-on-import", "model: raises_on_import:model_fn\n",
               r"^error: model: importing module 'raises_on_import' raised "
               r"ZeroDivisionError: division by zero$", kind=USER),
    train_yaml("model-function-missing", f"model: {HERE}:raising_model",
               rf"model: module '{HERE}' has no function 'raising_model'; define "
               r"model_fn\(features, labels, mode, params\) there or fix the name "
               r"after the colon \(did you mean 'raising_model_fn'\?\)"),
    train_yaml("model-not-a-function", f"model: {HERE}:NOT_A_FUNCTION\n",
               rf"model: module '{HERE}' has no function 'NOT_A_FUNCTION'"),
    train_yaml("model-wrong-arity", f"model: {HERE}:three_arg_model_fn\n",
               r"model: .*three_arg_model_fn cannot be called as model_fn\(features, "
               r"labels, mode, params\).*give it exactly 4 positional parameters"),
    train_yaml("input-wrong-arity", f"input: {HERE}:five_arg_input_fn\n",
               r"input: .*five_arg_input_fn cannot be called as input_fn\("
               r"worker_index, num_workers, batch_size, params\)"),
    # -- storage
    train_yaml("storage-ftp", "storage: ftp://host/x\nrun: bad-input\n",
               r"storage: ftp:// storage \('ftp://host/x'\) is not supported; use "
               r"s3://bucket/prefix, gs://bucket/prefix, or a local or NFS directory"),
    train_yaml("storage-s3-no-bucket", "storage: s3:///x\nrun: bad-input\n",
               r"storage: 's3:///x' names no bucket; use s3://bucket/prefix"),
    train_yaml("storage-s3-unreachable",
               "storage: s3://bucket/x\nrun: bad-input\nstorage_options: "
               "{endpoint_override: '127.0.0.1:9', scheme: http, region: us-east-1}\n",
               r"s3://bucket/x.*(does not answer|not answering|unreachable)"),
    train_yaml("storage-no-scheme", "storage: '://x'\nrun: bad-input\n",
               r"storage: '://x' is neither a directory path nor a URI.*use a "
               r"directory path"),
    train_yaml("storage-file-uri-relative", "storage: 'file://runs'\nrun: bad-input\n",
               r"storage: 'file://runs' is not a file URI with an absolute path; use "
               r"file:///abs/path"),
    train_yaml("storage-empty", "storage: ''\nrun: bad-input\n",
               r"storage: expected a directory path, got ''; use e\.g\."),
    train_cli("storage-under-a-file", ["--storage", "{tmp}/afile/storage",
                                       "--run", "bad-input"],
              r"storage: cannot write to '.*/afile/storage' \(Not a directory\); "
              r"point --storage .* at a writable directory",
              files={"afile": "a regular file, not a directory\n"}),
    train_cli("storage-under-proc", ["--storage", "/proc/bad-input-storage",
                                     "--run", "bad-input"],
              r"storage: cannot write to '/proc/bad-input-storage' .*point --storage "
              r".* at a writable directory"),
    # -- run names
    train_yaml("run-dotdot", "storage: '{tmp}/storage'\nrun: ../x\n",
               r"run: run name '\.\./x' is not valid: use 1-128 letters"),
    train_yaml("run-empty", "storage: '{tmp}/storage'\nrun: ''\n",
               r"run: run name '' is not valid: use 1-128 letters"),
    train_yaml("run-slash", "storage: '{tmp}/storage'\nrun: a/b\n",
               r"run: run name 'a/b' is not valid: use 1-128 letters"),
    # -- command line of jobs.train
    train_cli("cli-workers-zero", ["--workers", "0", *STORAGE],
              r"workers: expected a positive integer, got 0"),
    train_cli("cli-steps-negative", ["--steps", "-5", *STORAGE],
              r"steps: expected a positive integer, got -5"),
    train_cli("cli-workers-not-a-number", ["--workers", "abc", *STORAGE],
              r"argument --workers: invalid int value: 'abc'"),
    train_cli("cli-unknown-flag", ["--wokers", "2", *STORAGE],
              r"unrecognized arguments: --wokers"),
    train_cli("cli-run-dotdot", ["--storage", "{tmp}/storage", "--run", "../x"],
              r"run: run name '\.\./x' is not valid"),
    # -- jobs.restore
    restore("restore-missing-run", [*RESTORE],
            r"the following arguments are required: --run"),
    restore("restore-missing-export", ["--storage", "{tmp}/storage", "--run", "r"],
            r"the following arguments are required: --export"),
    restore("restore-step-and-best", [*RESTORE, "--run", "r", "--step", "5",
                                      "--best", "loss"],
            r"argument --best: not allowed with argument --step"),
    restore("restore-watch-and-step", [*RESTORE, "--run", "r", "--watch", "--step", "5"],
            r"--watch exports each new checkpoint; it does not take --step"),
    restore("restore-step-negative", [*RESTORE, "--run", "r", "--step", "-3"],
            r"argument --step: expected a step >= 0, got '-3'"),
    restore("restore-best-bad-mode", [*RESTORE, "--run", "r", "--best", "loss:sideways"],
            r"argument --best: 'loss:sideways' is not METRIC\[:min\|max\]; use e\.g\. "
            r"loss"),
    restore("restore-keep-zero", [*RESTORE, "--run", "r", "--watch", "--keep", "0"],
            r"argument --keep: expected an integer >= 1, got '0'"),
    restore("restore-bad-map", [*RESTORE, "--run", "r", "--map", "tower/"],
            r"--map: 'tower/' is not CKPT_PREFIX=GRAPH_PREFIX \(e\.g\. --map "
            r"tower/=serving/tower/\)"),
    restore("restore-unknown-run", [*RESTORE, "--run", "nope"],
            r"run 'nope' not found under '?.*storage'?.*check --storage and --run"),
    restore("restore-bad-run-name", [*RESTORE, "--run", "../x"],
            r"--run: run name '\.\./x' is not valid"),
    restore("restore-run-without-checkpoints", [*RESTORE, "--run", "empty-run"],
            r"run 'empty-run' has no committed serving checkpoint.*(train|wait)",
            files={EMPTY_RUN: EMPTY_RUN_RECORD}),
    restore("restore-step-not-committed", [*RESTORE, "--run", "empty-run", "--step", "5"],
            r"run 'empty-run' has no committed serving checkpoint at step 5 \(latest "
            r"serving steps: none\)", files={EMPTY_RUN: EMPTY_RUN_RECORD}),
]

# Modules the model cases import: one needs a package that is not installed,
# one fails while it is imported.
USER_MODULES = {
    "code/bad_dep_module.py": "import no_such_dependency_xyz\n",
    "code/raises_on_import.py": "SCALE = 1\nRATE = SCALE / 0  # the user's bug\n",
}


def run_entry(entry: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Runs ``python -m jobs.<entry> argv`` in-process; returns (exit code,
    stdout, stderr) as the interpreter would leave them."""
    module = jobs.train if entry == "train" else jobs.restore
    try:
        code = main_guard(lambda: module.main(argv))
    except SystemExit as e:  # argparse
        code = e.code
    except Exception:  # what `python -m` would print: the thing to avoid
        traceback.print_exc()
        code = 1
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root) -> list[str]:
    """Every path under ``root`` except the user modules' bytecode."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if "__pycache__" not in p.parts)


def _write_files(tmp_path, files) -> None:
    for name, text in {**USER_MODULES, **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{tmp}", str(tmp_path)))


@pytest.fixture
def ray_refused(monkeypatch):
    """Fails the test if ``train`` gets as far as starting or joining Ray."""
    def refuse():
        raise AssertionError("train() reached connect_ray(): this bad input must be "
                             "rejected before Ray starts")
    monkeypatch.setattr(trainer, "connect_ray", refuse)


@pytest.mark.parametrize("entry,files,argv,kind,pattern", CASES)
def test_bad_input_is_one_clear_error(entry, files, argv, kind, pattern, tmp_path,
                                      capsys, monkeypatch, ray_refused):
    (tmp_path / "storage").mkdir()
    _write_files(tmp_path, files)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = snapshot(tmp_path)
    repo_runs = os.path.exists(os.path.join(ROOT, "runs"))

    code, out, err = run_entry(entry, argv, capsys)

    assert PYTHON_TRACEBACK not in err + out, err
    assert code == 2, (code, err)
    assert out == "", out
    lines = err.strip().splitlines()
    if kind == LINE:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    else:  # the user's frame and line, once; no importlib or framework frames
        assert err.count("RATE = SCALE / 0  # the user's bug") == 1, err
        assert not re.search(r"<frozen|importlib|distributed/", err), err
        lines = lines[:1]
    assert re.search(pattern, lines[-1]), f"{pattern!r} not in {lines[-1]!r}"
    # Nothing written: the storage directory is as empty as before, no export.
    assert snapshot(tmp_path) == before
    assert os.path.exists(os.path.join(ROOT, "runs")) == repo_runs


def test_the_table_is_big_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------- needs a running Ray -----

NUM_CPUS = 4
BASE_YAML = ("steps: 20\nbatch_size: 16\nworkers: 2\ncpus_per_worker: 0.5\n"
             "log_every: 5\ncheckpoint: {serving_every: 0, full_every: 0}\n"
             "collective_timeout: 60\nmax_failures: 0\n")
MLP = "model: distributed.examples.digits:mlp_model_fn\n"

RAY_CASES = [
    pytest.param(BASE_YAML + MLP + "gpus_per_worker: 64\n",
                 r"gpus_per_worker: 2 workers x 64(\.0)? GPU need 128 GPUs but the "
                 r"cluster has \d+; lower --workers or gpus_per_worker", True,
                 id="more-gpus-than-the-cluster"),
    pytest.param(BASE_YAML + f"model: {HERE}:raising_model_fn\n",
                 r"model: tests\.test_bad_input:raising_model_fn raised ValueError: "
                 r"boom from raising_model_fn", True, id="model-fn-raises"),
    pytest.param(BASE_YAML + MLP + f"input: {HERE}:unpaired_input_fn\n",
                 r"input tests\.test_bad_input:unpaired_input_fn: the dataset's elements "
                 r"must be \(features dict, labels\) pairs", True, id="tfdata-not-pairs"),
    pytest.param(BASE_YAML + MLP + f"input: {HERE}:unknown_rank_input_fn\n",
                 r"feature 'image' has unknown rank; give it a static rank", True,
                 id="tfdata-unknown-rank"),
    pytest.param(BASE_YAML + MLP + f"input: {HERE}:per_worker_shape_input_fn\n",
                 r"input: \S+ gives features \{image: float32\[batch, 32\]\}.* on "
                 r"worker 1 but features \{image: float32\[batch, 64\]\}.* on worker 0",
                 True, id="tfdata-specs-differ-across-workers"),
    pytest.param(BASE_YAML + MLP + f"input: {HERE}:ending_input_fn\n",
                 r"the tf\.data dataset of \S+ ended on worker \d after step \d+; .*"
                 r"add \.repeat\(\)", False, id="tfdata-dataset-ends"),
    pytest.param(BASE_YAML + MLP + f"input: {{ray_dataset: {HERE}:digits_ray_dataset, "
                 "label: labels}\n",
                 r"input\.label: the dataset of \S+ has no column 'labels' \(did you mean "
                 r"'label'\?\); its columns are image, label", True,
                 id="raydata-no-such-label"),
    pytest.param(BASE_YAML + MLP + f"input: {{ray_dataset: {HERE}:empty_ray_dataset, "
                 "label: label}\n",
                 r"input\.ray_dataset: \S+ returned an empty dataset", True,
                 id="raydata-empty"),
    pytest.param(BASE_YAML + MLP + f"input: {{ray_dataset: {HERE}:list_ray_dataset, "
                 "label: label}\n",
                 r"input\.ray_dataset: \S+ returned list, not a ray\.data\.Dataset", True,
                 id="raydata-not-a-dataset"),
    # A loss that becomes NaN mid-run: tests/test_nan_loss.py (the message and
    # the checkpoints it keeps); other step-time errors through the CLI: the
    # dataset that ends above, tests/test_user_errors.py.
]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("text,pattern,nothing_written", RAY_CASES)
def test_bad_input_on_ray_is_one_clear_error(text, pattern, nothing_written, tmp_path,
                                             capsys, local_ray):
    storage = tmp_path / "storage"
    storage.mkdir()
    (tmp_path / CONFIG).write_text(text)

    code, out, err = run_entry("train", ["--config", str(tmp_path / CONFIG),
                                         "--storage", str(storage), "--run", "bad"],
                               capsys)

    assert PYTHON_TRACEBACK not in err + out, err
    assert code == 2, (code, out, err)
    assert err.startswith("error: "), err
    first = err.splitlines()[0]
    assert re.search(pattern, first), f"{pattern!r} not in {first!r}"
    assert "RayTaskError" not in err and "ray/_private" not in err, err
    if "raising_model_fn" in text:
        # The user's frame and error are shown once, our frames not at all.
        assert err.count('raise ValueError("boom from raising_model_fn")') == 1, err
        assert "distributed/train/" not in err, err
    if nothing_written:  # not even the run's directory (an ending input comes later)
        assert list(storage.rglob("*")) == []
