"""Checkpoints on object storage, against a real S3 server (moto_server) on
loopback: real store, real TF checkpoints, real HTTP. Faults are real too: the
server process is killed mid-upload, or a TCP link to it is cut at an exact
request while the server (and its state) lives on."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from distributed.checkpoint import (Catalog, CheckpointStore, CheckpointWriter,
                                    CorruptCatalogRowWarning, RunLayout,
                                    SelectionSpec, select_variables, verify_checkpoint)
from distributed.storage import remote as rmt
from distributed.storage import uris
from distributed.errors import (CheckpointExistsError, CheckpointNotFoundError,
                               StorageError)
from tests.conftest import build_tiny_model
from tests.helpers import s3_server

RUN = "run"
ONE_TRY = pafs.AwsStandardS3RetryStrategy(max_attempts=1)


@pytest.fixture(scope="module")
def s3():
    with s3_server.running() as server:
        yield server


@pytest.fixture(scope="module")
def staging(tmp_path_factory):
    """A local run with committed serving checkpoints at steps 10, 20 (small,
    2 shards) and 30 (~10 MiB, 8 shards)."""
    storage = str(tmp_path_factory.mktemp("staging"))
    store = CheckpointStore(storage, RUN)
    store.open()
    for steps, scale, shards in (((10, 20), 1, 2), ((30,), 2000, 8)):
        model = build_tiny_model(scale=scale)
        variables, _ = select_variables(model.graph, SelectionSpec("all"))
        writer = CheckpointWriter(variables, num_shards=shards)
        for step in steps:
            model.sess.run(model.train_op, {model.x: np.ones((4, 8), np.float32)})
            store.save(writer, model.sess, step, "serving", "{}", {"loss": step / 10})
        model.sess.close()
    return store


@pytest.fixture
def bucket(s3):
    return s3.make_bucket(f"b-{secrets.token_hex(4)}")


@pytest.fixture
def remote(s3, bucket):
    return rmt.open_remote(f"s3://{bucket}/pre", s3.options())


def _cache(tmp_path) -> str:
    return str(tmp_path / "cache" / RUN)


def _assert_same_tensors(a_dir: str, b_dir: str) -> None:
    import tensorflow as tf
    a = tf.train.load_checkpoint(os.path.join(a_dir, "model.ckpt"))
    b = tf.train.load_checkpoint(os.path.join(b_dir, "model.ckpt"))
    names = a.get_variable_to_shape_map()
    assert names == b.get_variable_to_shape_map() and names
    for name in names:
        np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name))


def _published_step(remote, step: int) -> bool:
    return (step, "serving") in remote.catalog_rows(RUN)


def test_is_object_store():
    assert all(uris.is_object_store(u) for u in ("s3://b/p", "gs://b", "S3://b"))
    for local in ("runs", "/mnt/runs", "file:///mnt/runs", "c:\\runs", "", None):
        assert not uris.is_object_store(local)


def test_publish_sync_fetch_verify(remote, staging, tmp_path, s3, bucket):
    root = staging.layout.root
    assert rmt.publish_checkpoint(remote, root, RUN, "serving", 10) > 0
    assert rmt.publish_checkpoint(remote, root, RUN, "serving", 20) > 0
    assert rmt.publish_checkpoint(remote, root, RUN, "serving", 20) == 0  # idempotent
    objects = s3.objects(bucket)
    for step in (10, 20):
        local = staging.layout.checkpoint_dir("serving", step)
        for name in os.listdir(local):
            key = f"pre/{RUN}/checkpoints/serving/step-{step:09d}/{name}"
            assert objects[key] == os.path.getsize(os.path.join(local, name))

    cache = _cache(tmp_path)
    sync = remote.sync_catalog_down(RUN, cache)
    assert len(sync.added) == 2 and not sync.removed and not sync.skipped
    entries = Catalog(RunLayout(os.path.dirname(cache), RUN)).entries()
    assert entries == staging.catalog.entries()[:2]
    # The remote catalog is plain Parquet, readable in place.
    table = ds.dataset(remote.path(f"{RUN}/catalog"), filesystem=remote.fs,
                       format="parquet").to_table()
    assert sorted(table.column("step").to_pylist()) == [10, 20]

    entry = entries[1]
    fetched = rmt.fetch_checkpoint(remote, RUN, "serving", 20, cache)
    assert fetched == os.path.join(cache, entry.path)
    verify_checkpoint(fetched, manifest_crc32c=entry.manifest_crc32c)
    _assert_same_tensors(staging.layout.checkpoint_dir("serving", 20), fetched)
    assert not [n for n in os.listdir(os.path.dirname(fetched)) if ".tmp-" in n]
    # A fresh mirror gets the row with the objects, so the local store reads it.
    fresh = str(tmp_path / "fresh" / RUN)
    rmt.fetch_checkpoint(remote, RUN, "serving", 10, fresh)
    assert CheckpointStore(os.path.dirname(fresh), RUN).verify(10).ok


def test_unpublish_deletes_the_row_before_the_objects(s3, bucket, staging, tmp_path):
    cutter = s3_server.LinkCutter(s3.port)
    try:
        remote = rmt.open_remote(f"s3://{bucket}/pre", s3.options(
            endpoint_override=cutter.endpoint, retry_strategy=ONE_TRY))
        for step in (10, 20):
            rmt.publish_checkpoint(remote, staging.layout.root, RUN, "serving", step)
        cache = _cache(tmp_path)
        row10 = remote.sync_catalog_down(RUN, cache).added[0]

        # Crash between the two deletions: the first request for the objects fails.
        cutter.cut_at(f"/{bucket}/pre/{RUN}/checkpoints".encode())
        with pytest.raises(StorageError):
            rmt.unpublish_checkpoint(remote, RUN, "serving", 10)
        assert cutter.fired.is_set()
        keys = s3.objects(bucket)
        assert not [k for k in keys if "catalog/step-000000010" in k]  # row gone first
        assert [k for k in keys if "step-000000010/" in k]  # objects left behind
        cutter.restore()
        assert not _published_step(remote, 10)  # readers no longer see it
        assert remote.sync_catalog_down(RUN, cache).removed == (row10,)
        assert rmt.remove_remote_leftovers(remote, RUN) == [
            f"{RUN}/checkpoints/serving/step-000000010"]
        assert not [k for k in s3.objects(bucket) if "step-000000010" in k]

        assert rmt.unpublish_checkpoint(remote, RUN, "serving", 20)
        assert not rmt.unpublish_checkpoint(remote, RUN, "serving", 20)
        assert not [k for k in s3.objects(bucket) if "step-0" in k]
        with pytest.raises(CheckpointNotFoundError):
            rmt.fetch_checkpoint(remote, RUN, "serving", 20, str(tmp_path / "c2" / RUN))
    finally:
        cutter.close()


def test_killed_server_mid_upload_never_received_the_row(staging, tmp_path):
    """The server dies during the data upload: publish raises a clear
    StorageError, and the server's own record of every request it received
    (written before it acts on each) holds data PUTs but no catalog row."""
    recording = str(tmp_path / "requests.jsonl")
    with s3_server.running(recording=recording) as server:
        bucket = server.make_bucket("doomed")
        uri = f"s3://{bucket}/pre"
        remote = rmt.open_remote(uri, server.options(retry_strategy=ONE_TRY))

        def kill_after_first_data_put():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                    r["method"] == "PUT" and "/checkpoints/" in r["url"]
                    for r in _requests(recording)):
                time.sleep(0.002)
            server.kill()

        killer = threading.Thread(target=kill_after_first_data_put)
        open(recording, "w").close()
        killer.start()
        with pytest.raises(StorageError) as err:
            rmt.publish_checkpoint(remote, staging.layout.root, RUN, "serving", 30,
                                   threads=1)
        killer.join()
    message = str(err.value)
    assert uri in message and "not committed remotely" in message
    assert "does not answer" in message and "\n" not in message
    requests = _requests(recording)
    puts = [r["url"] for r in requests if r["method"] == "PUT"]
    data_puts = [u for u in puts if "/checkpoints/serving/step-000000030/" in u]
    files = os.listdir(staging.layout.checkpoint_dir("serving", 30))
    assert 1 <= len(data_puts) < len(files)  # it died halfway through the data
    assert not [r for r in requests if "/catalog/" in r["url"] and r["method"] != "GET"]


def _requests(recording: str) -> list[dict]:
    """The requests a recording moto_server received (complete lines only)."""
    with open(recording) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


@pytest.mark.parametrize("cut", ["data", "row_unsent", "row_reply_lost"])
def test_a_cut_link_never_exposes_a_partial_checkpoint(s3, bucket, staging, tmp_path, cut):
    cutter = s3_server.LinkCutter(s3.port)
    ckpt = f"pre/{RUN}/checkpoints/serving/step-000000030/"
    try:
        remote = rmt.open_remote(f"s3://{bucket}/pre", s3.options(
            endpoint_override=cutter.endpoint, retry_strategy=ONE_TRY))
        if cut == "data":  # one shard fails, the link stays up: cleanup works
            cutter.cut_at(f"PUT /{bucket}/{ckpt}".encode(), stay_down=False)
        else:
            # One PUT: the row's bytes arrive whole or not at all.
            cutter.cut_at(f"PUT /{bucket}/pre/{RUN}/catalog/".encode(),
                          deliver=cut == "row_reply_lost")
        with pytest.raises(StorageError, match="not committed remotely"):
            rmt.publish_checkpoint(remote, staging.layout.root, RUN, "serving", 30)
        assert cutter.fired.is_set()
        cutter.restore()
        keys = s3.objects(bucket)
        rows = [k for k in keys if "/catalog/step-" in k]
        data = {k: v for k, v in keys.items() if k.startswith(ckpt)}
        local = staging.layout.checkpoint_dir("serving", 30)
        complete = {ckpt + n: os.path.getsize(os.path.join(local, n))
                    for n in os.listdir(local)}
        if cut == "data":
            assert rows == [] and data == {}  # the failed publish removed its objects
        elif cut == "row_unsent":
            assert rows == [] and data == complete  # cleanup could not run: leftovers
            assert rmt.remove_remote_leftovers(remote, RUN) == [
                f"{RUN}/checkpoints/serving/step-000000030"]
        else:  # the row arrived: committed, and complete
            assert len(rows) == 1 and data == complete
            assert rmt.remove_remote_leftovers(remote, RUN) == []
        assert _published_step(remote, 30) == (cut == "row_reply_lost")
        # Publishing again completes it (or finds it done).
        uploaded = rmt.publish_checkpoint(remote, staging.layout.root, RUN, "serving", 30)
        assert (uploaded == 0) == (cut == "row_reply_lost")
        cache = _cache(tmp_path)
        remote.sync_catalog_down(RUN, cache)
        entry = Catalog(RunLayout(os.path.dirname(cache), RUN)).get(30)
        fetched = rmt.fetch_checkpoint(remote, RUN, "serving", 30, cache)
        verify_checkpoint(fetched, manifest_crc32c=entry.manifest_crc32c)
    finally:
        cutter.close()


def test_sync_catalog_down_skips_a_corrupt_row_and_drops_deleted_ones(
        remote, staging, tmp_path):
    rmt.publish_checkpoint(remote, staging.layout.root, RUN, "serving", 10)
    remote.write_bytes(f"{RUN}/catalog/step-000000011.serving.00000000.parquet", b"junk")
    remote.write_bytes(f"{RUN}/catalog/notes.txt", b"ignored")
    cache = _cache(tmp_path)
    with pytest.warns(CorruptCatalogRowWarning, match="step-000000011.*corrupt"):
        sync = remote.sync_catalog_down(RUN, cache)
    assert [n[:14] for n in sync.added] == ["step-000000010"]
    assert [n[:14] for n in sync.skipped] == ["step-000000011"]
    assert sorted(os.listdir(os.path.join(cache, "catalog"))) == list(sync.added)
    row10 = sync.added[0]
    rmt.unpublish_checkpoint(remote, RUN, "serving", 10)
    with pytest.warns(CorruptCatalogRowWarning):
        sync = remote.sync_catalog_down(RUN, cache)
    assert sync.removed == (row10,) and sync.added == ()
    assert os.listdir(os.path.join(cache, "catalog")) == []


def test_remote_files_round_trip(remote, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big").write_bytes(os.urandom(56 << 20))  # several S3 parts, one flush
    (src / "sub" / "small").write_bytes(b"abc")
    (src / "empty").write_bytes(b"")
    assert remote.upload_dir(str(src), "d", threads=3) == (56 << 20) + 3
    assert [(f.name, f.size) for f in remote.list("d", recursive=True)] == [
        ("big", 56 << 20), ("empty", 0), ("sub/small", 3)]
    assert [(f.name, f.is_dir) for f in remote.list("d")] == [
        ("big", False), ("empty", False), ("sub", True)]
    assert remote.list("nothing") == []
    dst = tmp_path / "dst"
    assert remote.download_dir("d", str(dst)) == (56 << 20) + 3
    for name in ("big", "sub/small", "empty"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert remote.exists("d/sub/small") and remote.exists("d") and not remote.exists("e")
    assert remote.delete_file("d/sub/small") and not remote.delete_file("d/sub/small")
    assert remote.delete_dir("d") and not remote.exists("d/big")
    assert not remote.delete_dir("d")
    with pytest.raises(StorageError, match="holds no objects"):
        remote.download_dir("d", str(dst))
    with pytest.raises(StorageError, match="downloading 'd/big'"):
        remote.download_file("d/big", str(dst / "big"))
    assert sorted(os.listdir(dst)) == ["big", "empty", "sub"]  # no tmp files left
    for bad in ("/abs", "../up", "a//b", "a/./b"):
        with pytest.raises(ValueError):
            remote.path(bad)
    with pytest.raises(ValueError):
        remote.delete_dir("")
    remote.probe_write(RUN)
    assert remote.list(RUN, recursive=True) == []


def test_environment_variables_reach_the_endpoint(s3, bucket, monkeypatch, tmp_path):
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    plain = rmt.open_remote(f"s3://{bucket}/env")  # pyarrow's from_uri reads them
    plain.write_bytes("x", b"1")
    # With options, our code passes AWS_ENDPOINT_URL on itself.
    tuned = rmt.open_remote(f"s3://{bucket}/env", {"request_timeout": 30})
    assert tuned.read_bytes("x") == b"1"
    assert tuned.endpoint == s3.endpoint


def test_bad_uris_and_endpoints_give_one_clear_storage_error(s3, bucket):
    dead = f"http://127.0.0.1:{s3_server.free_port()}"
    cases = [
        ("foo://bucket/x", None, "not an object-store URI"),
        ("s3:///x", {"region": "us-east-1"}, "cannot be opened"),
        ("s3://", None, "names no bucket"),
        ("s3:///x", None, "cannot be opened: Missing bucket name"),
        ("runs/local", None, "not an object-store URI"),
        ("gs://bucket/x", {"region": "x"}, "only s3:// URIs|put its settings in the URI"),
        (f"s3://{bucket}/x", {"endpoint_override": dead, "retry_strategy": ONE_TRY},
         "cannot be reached.*does not answer"),
        ("s3://no-such-bucket/x", s3.options(), "bucket 'no-such-bucket' does not exist"),
    ]
    for uri, options, pattern in cases:
        with pytest.raises(StorageError, match=pattern) as err:
            rmt.open_remote(uri, options)
        message = str(err.value)
        assert "\n" not in message and "Traceback" not in message, message
        if uri.startswith("s3://") and "bucket" in uri:
            assert uri in message
    assert isinstance(err.value, OSError)


def test_publish_pending_catches_up_after_a_crash(remote, staging, tmp_path):
    rmt.publish_checkpoint(remote, staging.layout.root, RUN, "serving", 20)
    assert rmt.publish_pending(remote, staging.layout.root, RUN) == [
        (10, "serving"), (30, "serving")]
    assert sorted(remote.catalog_rows(RUN)) == [(10, "serving"), (20, "serving"),
                                                (30, "serving")]
    assert rmt.publish_pending(remote, staging.layout.root, RUN) == []
    # A different row for step 10 is already in the store: publishing must refuse.
    assert rmt.unpublish_checkpoint(remote, RUN, "serving", 10)
    remote.write_bytes(f"{RUN}/catalog/step-000000010.serving.0badc0de.parquet", b"x")
    with pytest.raises(CheckpointExistsError, match="different serving checkpoint"):
        rmt.publish_checkpoint(remote, staging.layout.root, RUN, "serving", 10)
    with pytest.raises(CheckpointNotFoundError, match="no locally committed"):
        rmt.publish_checkpoint(remote, staging.layout.root, RUN, "full", 10)
