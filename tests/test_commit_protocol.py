"""The commit protocol under crashes: nothing partial is ever visible."""

import os
import subprocess
import sys

import pytest

from distributed.checkpoint import PHASES, CheckpointStore, verify_checkpoint
from distributed.checkpoint.layout import atomic_write_bytes, catalog_row_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _listing(store):
    return sorted(e.step for e in store.catalog.entries())


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_writer_killed_at_each_phase(storage, phase):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.crash_writer", storage, phase],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    store = CheckpointStore(storage, "run")
    committed = phase == "committed"
    # Before cleanup, readers see step 1 only (step 2 too once its row exists).
    assert _listing(store) == ([1, 2] if committed else [1])
    newest = store.catalog.latest("serving")
    assert verify_checkpoint(store.checkpoint_dir(newest)).ok
    removed = store.open()
    tier_dir = store.layout.tier_dir("serving")
    left = sorted(os.listdir(tier_dir))
    assert left == (["step-000000001", "step-000000002"] if committed
                    else ["step-000000001"])
    if phase in ("tmp_created", "tensors_written", "manifest_written", "synced",
                 "renamed"):
        assert removed, "the crashed write should have left something to remove"
    assert _listing(store) == ([1, 2] if committed else [1])


def test_catalog_tmp_file_is_invisible_and_removed(storage):
    store = CheckpointStore(storage, "run")
    store.open()
    tmp = os.path.join(store.catalog.directory, catalog_row_name(3, "serving", 0) + ".tmp-dead")
    with open(tmp, "wb") as f:
        f.write(b"half a parquet")
    assert store.catalog.entries() == []
    assert store.open() == [tmp]
    assert not os.path.exists(tmp)


def test_orphan_directory_without_row_is_invisible_and_removed(storage):
    store = CheckpointStore(storage, "run")
    store.open()
    orphan = store.layout.checkpoint_dir("full", 7)
    os.makedirs(orphan)
    assert store.catalog.latest("full") is None
    assert orphan in store.open()
    assert not os.path.exists(orphan)


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(str(path), b"one")
    atomic_write_bytes(str(path), b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.bin"]
