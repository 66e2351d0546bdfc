"""RunStore: one run's storage, the same calls on a local directory and on a
real S3 server (moto_server on loopback). The tests that take ``where`` run
unchanged on both kinds: callers of a RunStore never ask which one they hold."""

from __future__ import annotations

import logging
import os
import secrets

import numpy as np
import pytest

from distributed.checkpoint import (CheckpointStore, CheckpointWriter, KeepLastN,
                                    Retention, SelectionSpec, lease,
                                    select_variables, verify_checkpoint)
from distributed.checkpoint.layout import RUN_CONFIG_FILE, TENSORBOARD_DIR
from distributed.errors import CheckpointNotFoundError, ConfigError
from distributed.storage.runstore import open_offline_writer, open_reader, open_writer
from tests.conftest import build_tiny_model
from tests.helpers import s3_server

RUN = "run"


@pytest.fixture(scope="module")
def s3():
    with s3_server.running() as server:
        yield server


class Where:
    """One place a run can live, and how to look at it without a RunStore."""

    def __init__(self, tmp_path, s3=None):
        self.s3 = s3
        self.staging = str(tmp_path / "staging")
        self.cache = str(tmp_path / "cache")
        if s3 is None:
            self.storage, self.options = str(tmp_path / "storage"), None
            os.makedirs(self.storage)
        else:
            self.bucket = s3.make_bucket(f"b-{secrets.token_hex(4)}")
            self.storage, self.options = f"s3://{self.bucket}/runs", s3.options()

    def writer(self, staging=None):
        return open_writer(self.storage, RUN, self.options, staging or self.staging)

    def reader(self):
        return open_reader(self.storage, RUN, self.options, self.cache)

    def stored(self) -> dict[str, int]:
        """``{path under the run: size}`` of every file on the storage of record."""
        if self.s3 is None:
            root = os.path.join(self.storage, RUN)
            return {os.path.relpath(os.path.join(d, n), root): os.path.getsize(
                os.path.join(d, n)) for d, _, names in os.walk(root) for n in names}
        prefix = f"runs/{RUN}/"
        return {k[len(prefix):]: v for k, v in self.s3.objects(self.bucket).items()
                if k.startswith(prefix)}

    def put_stray(self, rel_path: str) -> None:
        """Writes a file under the run straight to the storage of record."""
        if self.s3 is None:
            path = os.path.join(self.storage, RUN, rel_path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"stray")
        else:
            with self.s3.filesystem().open_output_stream(
                    f"{self.bucket}/runs/{RUN}/{rel_path}") as f:
                f.write(b"stray")

    def stored_rows(self) -> list[str]:
        return sorted(p.split("/")[1][:len("step-000000010.serving")]
                      for p in self.stored() if p.startswith("catalog/step-"))


@pytest.fixture(params=["directory", "s3"])
def where(request, tmp_path):
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    return Where(tmp_path, s3)


@pytest.fixture(scope="module")
def model():
    model = build_tiny_model()
    variables, _ = select_variables(model.graph, SelectionSpec("all"))
    model.writer = CheckpointWriter(variables, num_shards=2)
    yield model
    model.sess.close()


def save(store, model, step):
    model.sess.run(model.train_op, {model.x: np.ones((4, 8), np.float32)})
    return store.save(model.writer, model.sess, step, "serving", "{}", {"loss": step / 10})


def write_record(store):
    with open(os.path.join(store.layout.root, RUN_CONFIG_FILE), "w") as f:
        f.write('{"config": {}}')
    store.put_file(RUN_CONFIG_FILE)


def test_writer_commits_where_readers_find_it(where, model):
    writer = where.writer()
    writer.open()
    write_record(writer)
    save(writer, model, 10)
    assert where.stored_rows() == ["step-000000010.serving"]
    assert RUN_CONFIG_FILE in where.stored()
    ckpt = "checkpoints/serving/step-000000010/"
    assert {p for p in where.stored() if p.startswith(ckpt)} == {
        ckpt + n for n in os.listdir(writer.layout.checkpoint_dir("serving", 10))}

    reader = where.reader()
    assert [e.step for e in reader.catalog.entries()] == [10]
    entry20 = save(writer, model, 20)
    reader.sync()
    assert reader.catalog.get(20) == entry20
    with reader.reading("serving", 20):
        assert lease.live_leases(reader.layout, "serving", 20)
        fetched = reader.fetch("serving", 20)
        assert verify_checkpoint(fetched, manifest_crc32c=entry20.manifest_crc32c).ok
    assert lease.live_leases(reader.layout, "serving", 20) == []
    manifest = reader.read_manifest(reader.catalog.get(10))
    assert {t.name for t in manifest.tensors} == {v.op.name for v in model.variables}

    # Retention and quarantine delete on the storage of record, row first.
    assert [e.step for e in writer.apply_retention(Retention((KeepLastN(1),)))] == [10]
    assert where.stored_rows() == ["step-000000020.serving"]
    assert not [p for p in where.stored() if "step-000000010" in p]
    writer.quarantine(20, "serving", "a test")
    assert where.stored_rows() == []
    reader.sync()
    assert reader.catalog.entries() == []


def test_a_fresh_writer_resumes_from_the_storage_of_record(where, model, tmp_path):
    first = where.writer()
    first.open()
    entry = save(first, model, 10)
    # Another node: an empty staging mirror for an object store; the same
    # directory for local storage.
    second = where.writer(staging=str(tmp_path / "other-staging"))
    second.open()
    assert second.catalog.entries() == [entry]
    fetched = second.fetch("serving", 10)
    assert fetched == second.layout.checkpoint_dir("serving", 10)
    assert second.verify(10, "serving").ok


def test_open_finishes_what_a_crashed_writer_left(where, model):
    writer = where.writer()
    writer.open()
    # Committed in the local directory only: the writer died before publishing.
    CheckpointStore(writer.layout.storage, RUN).save(
        model.writer, model.sess, 10, "serving", "{}")
    # An upload (or save) interrupted before its catalog row.
    where.put_stray("checkpoints/serving/step-000000099/model.ckpt.index")
    removed = where.writer().open()
    assert where.stored_rows() == ["step-000000010.serving"]
    assert not [p for p in where.stored() if "step-000000099" in p]
    assert any("step-000000099" in p for p in removed), removed


def test_tensorboard_and_run_files_are_published_with_the_run(where):
    writer = where.writer()
    writer.open()
    path = os.path.join(writer.layout.root, TENSORBOARD_DIR, "events.out.tfevents.1")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"x" * 5)
    writer.put_file(f"{TENSORBOARD_DIR}/events.out.tfevents.1")
    assert where.stored()[f"{TENSORBOARD_DIR}/events.out.tfevents.1"] == 5


def test_tensorboard_events_are_published_at_most_every_30s_and_at_the_end(tmp_path, s3):
    from distributed.train.metrics import PUBLISH_SECONDS, RunMetrics
    where = Where(tmp_path, s3)
    writer = where.writer()
    writer.open()
    now = [1000.0]
    metrics = RunMetrics(writer, clock=lambda: now[0])
    metrics.record(1, {"loss": 1.0})
    local = os.path.join(writer.layout.root, TENSORBOARD_DIR)
    (name,) = os.listdir(local)
    rel = f"{TENSORBOARD_DIR}/{name}"
    first = where.stored()[rel]
    assert first == os.path.getsize(os.path.join(local, name))
    now[0] += PUBLISH_SECONDS / 2
    metrics.record(2, {"loss": 0.5})
    assert where.stored()[rel] == first  # too soon: published later
    metrics.publish(force=True)  # the end of the run
    assert where.stored()[rel] == os.path.getsize(os.path.join(local, name)) > first


def test_readers_refuse_a_run_that_is_not_there(where):
    with pytest.raises(CheckpointNotFoundError, match="run 'run' not found"):
        where.reader()
    with pytest.raises(ConfigError, match="--run: run name '../x' is not valid"):
        open_reader(where.storage, "../x", where.options, where.cache)


def test_gc_writes_a_directory_only_and_a_cache_is_never_the_staging(tmp_path, s3):
    local, remote = Where(tmp_path / "local"), Where(tmp_path / "remote", s3)
    for where in (local, remote):
        writer = where.writer()
        writer.open()
        write_record(writer)
    assert open_offline_writer(local.storage, RUN).layout == local.writer().layout
    with pytest.raises(ConfigError, match="is an object store.*gc works on a directory"):
        open_offline_writer(remote.storage, RUN)
    # Only a writer makes the TensorBoard directory; a reader refuses a mirror with one.
    os.makedirs(os.path.join(writer.layout.root, TENSORBOARD_DIR))
    with pytest.raises(ConfigError, match="staging mirror that the training job"):
        open_reader(remote.storage, RUN, remote.options, remote.staging)
    reader = open_reader(remote.storage, RUN, remote.options, remote.cache)
    assert reader.catalog.entries() == []


def test_local_directory_names_the_runs_it_holds(tmp_path):
    store = open_writer(str(tmp_path), "present")
    store.open()
    with pytest.raises(CheckpointNotFoundError, match="runs there: present; check"):
        open_reader(str(tmp_path), "absent")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        open_reader(str(tmp_path / "nowhere"), "present")
    assert not os.path.exists(tmp_path / "nowhere")
    assert open_reader(f"file://{tmp_path}", "present").layout == store.layout


def test_reading_without_a_lease_warns_once(tmp_path, model, caplog):
    store = open_writer(str(tmp_path), RUN)
    store.open()
    save(store, model, 10)
    # Leases cannot be written: their directory's name is taken by a file.
    open(os.path.join(store.layout.root, lease.LEASES_DIR), "w").close()
    reader = open_reader(str(tmp_path), RUN)
    with caplog.at_level(logging.WARNING, logger="distributed.storage.runstore"):
        for _ in range(2):
            with reader.reading("serving", 10):
                assert reader.verify(10).ok
    (warning,) = [r for r in caplog.records if "reader lease" in r.getMessage()]
    assert "reading without one" in warning.getMessage()
