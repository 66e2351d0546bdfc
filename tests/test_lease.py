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
        json.dump({"holder": "gone:1", "expires": time.time() - 3600}, f)
    garbage = os.path.join(lease.leases_dir(store.layout), "serving.step-000000001.bad.json")
    with open(garbage, "w") as f:
        f.write("{not json")
    assert lease.live_leases(store.layout, "serving", 1) == []
    store.save(writer, sess, 2, "serving", "{}")
    store.apply_retention(KEEP_ONE)
    assert not os.path.exists(store.layout.checkpoint_dir("serving", 1))
    store.open()
    assert os.listdir(lease.leases_dir(store.layout)) == []


class FakeClock:
    """A wall clock the test moves; :meth:`wait_for_read` waits (on an event,
    not a sleep) until the lease reads it again, i.e. until it renews."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now
        self._reads = threading.Condition()
        self._count = 0

    def __call__(self) -> float:
        with self._reads:
            self._count += 1
            self._reads.notify_all()
            return self.now

    def reads(self) -> int:
        with self._reads:
            return self._count

    def wait_for_read(self, after: int, timeout: float = 60.0) -> bool:
        with self._reads:
            return self._reads.wait_for(lambda: self._count > after, timeout)


def test_lease_is_renewed_while_held_and_removed_on_release(tmp_path):
    from distributed.checkpoint.layout import RunLayout
    run = RunLayout(str(tmp_path), "run")
    clock = FakeClock()
    # ttl only sets the renewal cadence here (every ttl/3 s of real time);
    # whether the lease is live is decided on the fake clock.
    with lease.Lease(run, "full", 7, ttl=0.3, clock=clock) as held:
        first = json.load(open(held.path))["expires"]
        assert first == clock.now + 0.3
        assert lease.live_leases(run, "full", 7, now=clock.now) == [held.path]
        reads = clock.reads()
        clock.now += 3600.0  # an hour later: lapsed, unless renewed
        assert lease.live_leases(run, "full", 7, now=clock.now) == []
        assert clock.wait_for_read(reads), "the lease was never renewed"
        for _ in range(2):  # the read precedes the write: wait for one more
            reads = clock.reads()
            assert clock.wait_for_read(reads), "the lease stopped renewing"
        assert json.load(open(held.path))["expires"] == clock.now + 0.3
        assert lease.live_leases(run, "full", 7, now=clock.now) == [held.path]
        # A crashed holder stops renewing: ttl after its last renewal it lapses.
        assert lease.live_leases(run, "full", 7, now=clock.now + 0.31) == []
    assert lease.live_leases(run, "full", 7, now=clock.now) == []
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
    # Counts, not a time budget: at least 20 commits and 10 reads under way
    # (the bound only stops a broken reader from hanging the test).
    deadline = time.monotonic() + 300.0
    while (step < 21 or stats["read"] < 10) and not errors:
        assert time.monotonic() < deadline, (stats, step)
        step += 1
        store.save(writer, sess, step, "serving", "{}")
        store.apply_retention(KEEP_ONE)
    stop.set()
    for t in threads:
        t.join()
    assert errors == [], errors
    store.apply_retention(KEEP_ONE)  # readers gone: deferred deletions finish
    assert os.listdir(store.layout.tier_dir("serving")) == [f"step-{step:09d}"]
    assert lease.deferred(store.layout) == []
