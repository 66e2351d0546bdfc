"""Training and restore against a real S3-compatible server (moto_server on
loopback, a subprocess) on a real local Ray: the checkpoints are staged
locally, uploaded with the catalog row last, deleted remotely by retention,
fetched back to resume on a fresh node and to export for serving."""

from __future__ import annotations

import json
import os
import secrets
import shutil

import pytest

from distributed import config as config_lib
from distributed.storage import uris
from distributed.errors import ConfigError
from distributed.serving.job import restore_once
from distributed.train import trainer
from tests.helpers import s3_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MLP = "distributed.examples.digits:mlp_model_fn"


@pytest.fixture(scope="module")
def s3():
    with s3_server.running() as server:
        yield server


def make_config(s3, bucket, staging, steps):
    return config_lib.from_dict({
        "storage": f"s3://{bucket}/runs", "storage_options": s3.options(),
        "staging": str(staging), "run": "exp", "model": MLP, "steps": steps,
        "batch_size": 32, "workers": 2, "cpus_per_worker": 0.5, "log_every": 10,
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "checkpoint": {"serving_every": 10, "full_every": 20},
        "retention": {"serving": {"keep_last": 2}, "full": {"keep_last": 2}}})


def remote_rows(s3, bucket) -> list[str]:
    return sorted(k.split("/")[-1].split(".")[0] + "." + k.split("/")[-1].split(".")[1]
                  for k in s3.objects(bucket) if "/catalog/step-" in k)


def test_train_resume_and_restore_through_s3(s3, local_ray, tmp_path, capsys):
    bucket = s3.make_bucket(f"b-{secrets.token_hex(4)}")
    lines: list[str] = []
    summary = trainer.train(make_config(s3, bucket, tmp_path / "staging", 40),
                            echo=lines.append)
    assert summary["steps"] == 40, lines
    # Retention ran remotely too: rows and objects of steps 10 and 20 are gone.
    assert remote_rows(s3, bucket) == ["step-000000020.full", "step-000000030.serving",
                                       "step-000000040.full", "step-000000040.serving"]
    keys = s3.objects(bucket)
    assert "runs/exp/run_config.json" in keys
    for step in (10, 20):
        assert not [k for k in keys if f"serving/step-{step:09d}/" in k]
    ckpt40 = [k for k in keys if "serving/step-000000040/" in k]
    assert {os.path.basename(k) for k in ckpt40} >= {"manifest.parquet", "model.ckpt.index"}
    assert not [k for k in keys if ".tmp-" in k]
    # TensorBoard's event file is uploaded too, complete at the end of the run.
    (events,) = [k for k in keys if "runs/exp/tensorboard/events.out.tfevents." in k]
    local_events = os.path.join(
        uris.staging_path(f"s3://{bucket}/runs", str(tmp_path / "staging")),
        "exp", "tensorboard", os.path.basename(events))
    assert keys[events] == os.path.getsize(local_events) > 0

    # A fresh node (empty staging) resumes from the full checkpoint in S3.
    shutil.rmtree(tmp_path / "staging")
    lines = []
    summary = trainer.train(make_config(s3, bucket, tmp_path / "staging", 60),
                            echo=lines.append)
    assert summary["steps"] == 60
    assert any("resuming run 'exp' from its full checkpoint at step 40" in line
               for line in lines), lines
    assert "step-000000060.full" in remote_rows(s3, bucket)

    # The restore job reads S3 through its own cache and exports the newest.
    out: list[str] = []
    result = restore_once(f"s3://{bucket}/runs", "exp", str(tmp_path / "export"),
                          echo=out.append, storage_options=s3.options(),
                          cache=str(tmp_path / "cache"))
    assert result.step == 60 and os.path.isfile(
        os.path.join(tmp_path, "export", "60", "saved_model.pb")), out
    import tensorflow as tf
    loaded = tf.saved_model.load(str(tmp_path / "export" / "60"))
    assert "serving_default" in loaded.signatures

    # The checkpoint CLI reads the same run through a cache of its own.
    from distributed.cli.ckpt.cli import main as ckpt_main
    opts = [f"--storage-option={k}={v}" for k, v in s3.options().items()]
    base = ["--storage", f"s3://{bucket}/runs", "--run", "exp", *opts,
            "--cache", str(tmp_path / "cli-cache")]
    capsys.readouterr()
    assert ckpt_main(["ls", *base, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert {(c["tier"], c["step"]) for c in listed} == {
        ("full", 40), ("full", 60), ("serving", 50), ("serving", 60)}
    assert ckpt_main(["show", "60", *base, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["checkpoint"]["step"] == 60 and shown["tensors"]
    # show downloads the manifest alone, into a temporary directory.
    assert not os.path.exists(os.path.join(
        uris.staging_path(f"s3://{bucket}/runs", str(tmp_path / "cli-cache")),
        "exp", "checkpoints", "serving", "step-000000060"))
    assert ckpt_main(["verify", *base, "--tier", "full"]) == 0
    out = capsys.readouterr().out
    assert "OK   full    step 40" in out and "0 of 2 checkpoint(s) bad" in out, out
    assert ckpt_main(["diff", "40", "60", "--tier", "full", *base]) == 0
    assert "A = full step 40, B = full step 60" in capsys.readouterr().out
    assert ckpt_main(["gc", *base]) == 2
    assert "is an object store" in capsys.readouterr().err

    # A reader's cache must never be the writer's staging mirror: syncing the
    # catalog there would drop rows the coordinator has not uploaded yet.
    with pytest.raises(ConfigError, match="staging mirror that the training job"):
        restore_once(f"s3://{bucket}/runs", "exp", str(tmp_path / "export2"),
                     echo=lambda line: None, storage_options=s3.options(),
                     cache=str(tmp_path / "staging"))
    # The checkpoint CLI refuses it too, with one error line, and leaves the
    # mirror's catalog as the coordinator wrote it.
    mirror_catalog = os.path.join(
        uris.staging_path(f"s3://{bucket}/runs", str(tmp_path / "staging")),
        "exp", "catalog")
    rows = sorted(os.listdir(mirror_catalog))
    assert rows
    on_staging = ["--storage", f"s3://{bucket}/runs", "--run", "exp", *opts,
                  "--cache", str(tmp_path / "staging")]
    for command in (["ls"], ["verify"], ["show", "60"]):
        capsys.readouterr()
        assert ckpt_main([*command, *on_staging]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: --cache: ") and err.count("\n") == 1, err
        assert "staging mirror that the training job of run 'exp' writes" in err, err
    assert sorted(os.listdir(mirror_catalog)) == rows
