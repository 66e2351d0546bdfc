"""Reader leases against retention: real store, real TF checkpoints, real threads."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from distributed.checkpoint import (CheckpointStore, CheckpointWriter, KeepLastN,
                                    Retention, SelectionSpec, select_variables)
from distributed.checkpoint import lease
from distributed.checkpoint.verify import verify_checkpoint
from distributed.errors import CheckpointCorruptError

KEEP_ONE = Retention((KeepLastN(1),))


@pytest.fixture
def store_and_writer(tiny_model, storage):
    variables, _ = select_variables(tiny_model.graph, SelectionSpec("all"))
    store = CheckpointStore(storage, "run")
    store.open()
    return store, CheckpointWriter(variables), tiny_model.sess


def test_leased_checkpoint_outlives_retention_until_released(store_and_writer):
    store, writer, sess = store_and_writer
    store.save(writer, sess, 1, "serving", "{}")
    step1 = store.layout.checkpoint_dir("serving", 1)
    with lease.Lease(store.layout, "serving", 1):
        store.save(writer, sess, 2, "serving", "{}")
        deleted = store.apply_retention(KEEP_ONE)
        assert [e.step for e in deleted] == [1]
        assert list(store.catalog.committed_keys()) == [(2, "serving")]  # gone for new readers
        verify_checkpoint(step1)  # ... but whole for the reader holding the lease
        assert lease.deferred(store.layout) == [("serving", 1)]
        store.open()  # a restart's leftover sweep respects the lease too
        assert os.path.isdir(step1)
    assert os.path.isdir(step1)  # deleted by the next retention pass, not on release
    store.save(writer, sess, 3, "serving", "{}")
    store.apply_retention(KEEP_ONE)
    assert not os.path.exists(step1)
    assert lease.deferred(store.layout) == []
    assert os.listdir(store.layout.tier_dir("serving")) == ["step-000000003"]


def test_a_crashed_readers_lease_lapses(store_and_writer):
    store, writer, sess = store_and_writer
    store.save(writer, sess, 1, "serving", "{}")
    os.makedirs(lease.leases_dir(store.layout), exist_ok=True)
    stale = os.path.join(lease.leases_dir(store.layout), "serving.step-000000001.dead.json")
    with open(stale, "w") as f:
        json.dump({"holder": "gone:1", "expires": time.time() - 1}, f)
    garbage = os.path.join(lease.leases_dir(store.layout), "serving.step-000000001.bad.json")
    with open(garbage, "w") as f:
        f.write("{not json")
    assert lease.live_leases(store.layout, "serving", 1) == []
    store.save(writer, sess, 2, "serving", "{}")
    store.apply_retention(KEEP_ONE)
    assert not os.path.exists(store.layout.checkpoint_dir("serving", 1))
    store.open()
    assert os.listdir(lease.leases_dir(store.layout)) == []


def test_lease_is_renewed_while_held_and_removed_on_release(tmp_path):
    from distributed.checkpoint.layout import RunLayout
    run = RunLayout(str(tmp_path), "run")
    with lease.Lease(run, "full", 7, ttl=0.3) as held:
        first = json.load(open(held.path))["expires"]
        time.sleep(0.5)  # longer than the ttl: only renewal keeps it live
        assert lease.live_leases(run, "full", 7) == [held.path]
        assert json.load(open(held.path))["expires"] > first
    assert lease.live_leases(run, "full", 7) == []
    assert not os.path.exists(held.path)
    with pytest.raises(ValueError, match="ttl"):
        lease.Lease(run, "full", 7, ttl=0)


def test_reader_never_sees_a_partial_or_vanishing_checkpoint(store_and_writer):
    """A reader loops (pick newest, lease, re-check, verify every byte) while a
    writer commits new checkpoints and retention keeps only the newest."""
    store, writer, sess = store_and_writer
    store.save(writer, sess, 1, "serving", "{}")
    stop = threading.Event()
    errors: list[BaseException] = []
    stats = {"read": 0, "lost_race": 0}

    def reader():
        catalog = CheckpointStore(store.layout.storage, "run").catalog
        while not stop.is_set():
            try:
                latest = catalog.latest("serving")
                with lease.Lease(store.layout, "serving", latest.step):
                    if (latest.step, "serving") not in catalog.committed_keys():
                        stats["lost_race"] += 1  # retention won: pick again
                        continue
                    verify_checkpoint(store.layout.checkpoint_dir("serving", latest.step))
                    stats["read"] += 1
            except (CheckpointCorruptError, OSError, Exception) as e:  # noqa: B014
                errors.append(e)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    step = 1
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline and not errors:
        step += 1
        store.save(writer, sess, step, "serving", "{}")
        store.apply_retention(KEEP_ONE)
    stop.set()
    for t in threads:
        t.join()
    assert errors == [], errors
    assert stats["read"] > 10 and step > 10, (stats, step)
    store.apply_retention(KEEP_ONE)  # readers gone: deferred deletions finish
    assert os.listdir(store.layout.tier_dir("serving")) == [f"step-{step:09d}"]
    assert lease.deferred(store.layout) == []
