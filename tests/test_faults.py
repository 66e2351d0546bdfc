"""Faults survived with nothing lost, each on a real local Ray with real TF.

A worker process killed with SIGKILL mid-step, the coordinator's process dying
at every phase of the commit protocol, the storage filling up mid-save, the
driver stopped by SIGTERM/SIGINT: each time the job either finishes its steps
(resuming from the latest full checkpoint) or fails with a clear message, no
partial checkpoint is ever visible, and every committed checkpoint verifies.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import tensorflow as tf

from distributed import config as config_lib
from distributed.checkpoint import Catalog, RunLayout
from distributed.checkpoint.layout import TMP_MARKER
from distributed.checkpoint.store import PHASES
from distributed.checkpoint.verify import verify_checkpoint
from distributed.errors import TrainingFailedError
from distributed.train import trainer
from tests.conftest import REPO_ROOT, skip_or_fail_in_ci
from tests.helpers.fault_actors import (CrashingCoordinator, FailingSaveCoordinator,
                                        Killer, SlowSavingCoordinator)
from tests.helpers.training import MLP, tensorboard_scalars
from tests.helpers.training import make_config as train_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NUM_CPUS = 4


def make_config(storage: str, run: str, **overrides) -> config_lib.TrainConfig:
    """The training tests' small config, on the MLP, with a full checkpoint
    every 20 steps and room for two restarts."""
    return train_config(storage, run, **{
        "model": MLP, "log_every": 10,
        "checkpoint": {"serving_every": 10, "full_every": 20},
        "retention": {"serving": {"keep_last": 20}, "full": {"keep_last": 20}},
        "collective_timeout": 30.0, "max_failures": 2, **overrides})


def committed_and_sound(storage: str, run: str) -> list[tuple[int, str]]:
    """Every committed checkpoint verifies and no in-flight leftovers are
    visible as committed; returns the committed (step, tier) keys."""
    catalog = Catalog(RunLayout(storage, run))
    keys = []
    for entry in catalog.entries():
        verify_checkpoint(os.path.join(RunLayout(storage, run).root, entry.path))
        keys.append((entry.step, entry.tier))
    return sorted(keys)


def leftovers(storage: str, run: str) -> list[str]:
    root = RunLayout(storage, run).root
    return [os.path.join(d, n) for d, dirs, files in os.walk(root)
            for n in dirs + files if TMP_MARKER in n]


def test_worker_killed_mid_step_group_restarts_from_full_checkpoint(local_ray, tmp_path,
                                                                    own_workers):
    storage = str(tmp_path / "storage")
    config = make_config(storage, "kill-worker", steps=200)
    rng = random.Random(7)
    lines, killers = [], []

    def echo(line):
        lines.append(line)
        if not killers and "committed full checkpoint at step 20" in line:
            killers.append(Killer(storage, rng))

    summary = trainer.train(config, echo=echo)
    killers[0].check()
    text = "\n".join(lines)
    assert summary["steps"] == 200
    assert len(summary["failures"]) == 1, text
    assert "FAILURE after step" in text and "died" in summary["failures"][0], text
    resumed = re.search(r"restarted: resuming from the full checkpoint at step (\d+); "
                        r"(?:steps (\d+)\.\.(\d+) are redone \((\d+) steps\)|"
                        r"only the interrupted round's steps are redone)", text)
    assert resumed, text
    full = int(resumed.group(1))
    assert full >= 20 and full % 20 == 0, text
    if resumed.group(2) is not None:  # the kill came after the last round's end
        first, last, count = map(int, resumed.groups()[1:])
        assert first == full + 1, text
        assert count == last - full and count <= 20, text  # at most one interval lost
    keys = committed_and_sound(storage, "kill-worker")
    assert [s for s, t in keys if t == "serving"] == list(range(10, 201, 10)), text
    assert [s for s, t in keys if t == "full"] == list(range(20, 201, 20)), text
    assert leftovers(storage, "kill-worker") == []
    final = tf.train.load_checkpoint(os.path.join(
        RunLayout(storage, "kill-worker").checkpoint_dir("full", 200), "model.ckpt"))
    assert final.get_tensor("global_step") == 200


def test_stalled_worker_collective_times_out_and_group_restarts(local_ray, tmp_path,
                                                                own_workers):
    """A worker that stops answering (SIGSTOP: alive, silent) must not hang the
    job: its peer's step fails after collective_timeout and the group restarts."""
    storage = str(tmp_path / "storage")
    config = make_config(storage, "stall", steps=200, collective_timeout=5.0)
    rng = random.Random(3)
    lines, stoppers = [], []

    def echo(line):
        lines.append(line)
        if not stoppers and "committed full checkpoint at step 20" in line:
            stoppers.append(Killer(storage, rng, signal.SIGSTOP))

    start = time.monotonic()
    summary = trainer.train(config, echo=echo)
    stoppers[0].check()
    text = "\n".join(lines)
    assert summary["steps"] == 200 and len(summary["failures"]) == 1, text
    # Stopped inside a collective, the peer's step times out; stopped between
    # collectives (end of a round), the trainer's straggler deadline fires.
    failure = summary["failures"][0]
    assert ("DeadlineExceededError" in failure and "a peer died or stalled" in failure) \
        or "stopped responding" in failure, failure
    assert time.monotonic() - start < 120, "the stalled step was not cut short"
    keys = committed_and_sound(storage, "stall")
    assert (200, "full") in keys and (200, "serving") in keys


def test_more_failures_than_allowed_fails_clearly_and_keeps_checkpoints(local_ray, tmp_path,
                                                                        own_workers):
    storage = str(tmp_path / "storage")
    config = make_config(storage, "give-up", max_failures=0, steps=200)
    rng = random.Random(11)
    killers = []

    def echo(line):
        if not killers and "committed full checkpoint at step 20" in line:
            killers.append(Killer(storage, rng))

    with pytest.raises(TrainingFailedError, match=r"failed 1 times, more than "
                       r"max_failures=0.*are intact.*same --run to resume"):
        trainer.train(config, echo=echo)
    killers[0].check()
    keys = committed_and_sound(storage, "give-up")
    assert (20, "full") in keys and (10, "serving") in keys


def readme_tensorboard_tags() -> list[str]:
    """The tags README.md's "Watching a run" lists, ``<tier>`` expanded."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("- **TensorBoard**"):text.index("- **Logs**")]
    listed = section[section.index("Tags:"):section.index("On an object store")]
    tags = []
    for tag in re.findall(r"`([\w<>]+(?:/[\w<>]+)+)`", listed):
        tags += [tag.replace("<tier>", t) for t in ("serving", "full")] \
            if "<tier>" in tag else [tag]
    assert len(tags) >= 10, f"the README's tag list did not parse: {listed!r}"
    return tags


def test_every_tensorboard_tag_the_readme_lists_is_written(local_ray, tmp_path,
                                                           own_workers):
    """A run with a failed save of each tier and a group restart writes every
    tag README.md lists, so README and code cannot drift apart unnoticed."""
    storage = str(tmp_path / "storage")
    os.makedirs(storage)
    with open(os.path.join(storage, "fail_saves.json"), "w") as f:
        json.dump([["serving", 10], ["full", 20]], f)
    config = make_config(storage, "tags", steps=100, max_failures=1)
    rng = random.Random(5)
    lines, killers = [], []

    def echo(line):
        lines.append(line)
        if not killers and "committed full checkpoint at step 40" in line:
            killers.append(Killer(storage, rng))

    summary = trainer.train(config, echo=echo, coordinator_cls=FailingSaveCoordinator)
    killers[0].check()
    text = "\n".join(lines)
    assert summary["steps"] == 100 and len(summary["failures"]) == 1, text
    failed = sorted(re.search(r"saving (\w+) checkpoint of run 'tags' at step (\d+) "
                              r"failed: the disk is full", e.error).groups()
                    for e in summary["events"] if e.kind == "failed")
    assert failed == [("full", "20"), ("serving", "10")], text
    scalars = tensorboard_scalars(os.path.join(storage, "tags", "tensorboard"))
    tags = readme_tensorboard_tags()
    missing = [t for t in tags if t not in scalars]
    assert not missing, (f"README lists TensorBoard tags the run never wrote: {missing}; "
                         f"written: {sorted(scalars)}")
    assert [s for s, _ in scalars["checkpoint/serving/failed_saves"]] == [10]
    assert [s for s, _ in scalars["checkpoint/full/failed_saves"]] == [20]
    assert [v for _, v in scalars["train/group_restarts"]] == [1.0]


def test_coordinator_dies_at_every_commit_phase_nothing_partial_visible(local_ray, tmp_path):
    storage = str(tmp_path / "storage")
    os.makedirs(storage)
    with open(os.path.join(storage, "crash_plan.json"), "w") as f:
        json.dump(list(PHASES), f)
    config = make_config(storage, "kill-coord", steps=60, max_failures=len(PHASES),
                         checkpoint={"serving_every": 10, "full_every": 10})
    checks = []

    def echo(line):
        if line.startswith("FAILURE"):
            # The moment after a crash: only whole checkpoints are committed.
            checks.append(committed_and_sound(storage, "kill-coord"))

    summary = trainer.train(config, echo=echo, coordinator_cls=CrashingCoordinator)
    with open(os.path.join(storage, "crash_plan.json")) as f:
        assert json.load(f) == []  # every phase crashed once
    assert summary["steps"] == 60
    assert len(summary["failures"]) == len(PHASES)
    assert all("coordinator" in f for f in summary["failures"]), summary["failures"]
    assert len(checks) == len(PHASES)
    keys = committed_and_sound(storage, "kill-coord")
    assert (60, "full") in keys and (60, "serving") in keys
    assert leftovers(storage, "kill-coord") == []


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def _fill(mount: str) -> None:
    with open(os.path.join(mount, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _read_only(mount: str) -> None:
    """Makes the run's checkpoints directory read-only with a read-only bind
    mount over it (remounting the whole tmpfs read-only fails while the
    coordinator holds its TensorBoard event file open)."""
    target = os.path.join(mount, "storage", "fault", "checkpoints")
    subprocess.run(["mount", "--bind", target, target], check=True, capture_output=True)
    deadline = time.monotonic() + 60  # a generous margin, not a timing claim
    while time.monotonic() < deadline:  # EBUSY while a save in flight has a file open
        if subprocess.run(["mount", "-o", "remount,bind,ro", target],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"could not make {target} read-only")


def _writable_again(mount: str) -> None:
    subprocess.run(["umount", os.path.join(mount, "storage", "fault", "checkpoints")],
                   check=True, capture_output=True)


STORAGE_FAULTS = {
    # name: (break the storage, repair it)
    "disk-full": (_fill, lambda mount: os.unlink(os.path.join(mount, "filler"))),
    "read-only": (_read_only, _writable_again),
}


@pytest.mark.parametrize("fault", sorted(STORAGE_FAULTS))
def test_storage_fault_mid_training_save_fails_cleanly_and_next_save_retries(
        local_ray, tmp_path, fault):
    mount = str(tmp_path / "small")
    if not _mount_tmpfs(mount, "8m"):
        skip_or_fail_in_ci("cannot mount a tmpfs here (not root); the injected write "
                           "failure of test_commit_protocol covers the store")
    break_storage, repair_storage = STORAGE_FAULTS[fault]
    try:
        storage = os.path.join(mount, "storage")
        config = make_config(storage, "fault", steps=80, max_failures=0,
                             checkpoint={"serving_every": 10, "full_every": 40})
        state = {"broken": False, "repaired": False}
        lines = []

        def echo(line):
            lines.append(line)
            if not state["broken"] and "committed serving" in line:
                state["broken"] = True
                break_storage(mount)
            elif state["broken"] and not state["repaired"] and "FAILED" in line:
                # What a failed save leaves visible: only whole checkpoints. (Its
                # tmp directory is gone, but the next save may be in flight now,
                # so leftovers are checked once training has ended.)
                state["visible_after_failure"] = committed_and_sound(storage, "fault")
                state["repaired"] = True
                repair_storage(mount)

        summary = trainer.train(config, echo=echo)
        text = "\n".join(lines)
        failed = [e for e in summary["events"] if e.kind == "failed"]
        assert summary["steps"] == 80 and failed and state["repaired"], text
        last_failure = max(i for i, e in enumerate(summary["events"])
                           if e.kind == "failed")
        later = [e for e in summary["events"][last_failure:] if e.kind == "committed"]
        assert later, text  # the next save after the failure succeeded
        keys = committed_and_sound(storage, "fault")
        assert (80, "serving") in keys and (80, "full") in keys
        assert set(state["visible_after_failure"]) <= set(keys)
        assert leftovers(storage, "fault") == []
    finally:
        subprocess.run(["umount", "-R", "-l", mount], capture_output=True)


def _job(args, storage, run, ray_tmp, **kw):
    """``python -m jobs.train`` in local dev mode. Its Ray lives under its own
    ``RAY_TMPDIR``: a plain ``ray.init()`` joins any Ray that advertises itself
    in the machine's ``/tmp/ray`` (another test session's, say) instead of
    starting its own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_ADDRESS") and k != "DTR_VERBOSE"}
    env["PYTHONPATH"] = REPO_ROOT
    env["RAY_TMPDIR"] = ray_tmp
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.train", "--storage", storage, "--run", run, *args],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, **kw)


@pytest.fixture
def ray_tmp():
    """A private Ray temp dir, short (Ray's unix sockets live under it)."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_driver_stopped_by_sigterm_cleans_up_and_rerun_resumes(tmp_path, ray_tmp):
    """What `ray job stop` does to the driver (SIGTERM), in local dev mode."""
    storage = str(tmp_path / "storage")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {MLP}\nsteps: 100000\nworkers: 2\nlog_every: 10\n"
                   "batch_size: 32\ncheckpoint: {serving_every: 10, full_every: 10}\n")
    job = _job(["--config", str(cfg)], storage, "stopped", ray_tmp)
    catalog = Catalog(RunLayout(storage, "stopped"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:
        if os.path.isdir(catalog.directory) and catalog.latest("full") is not None:
            break
        time.sleep(0.5)
    assert job.poll() is None, job.communicate()[0]
    children = psutil.Process(job.pid).children(recursive=True)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 130, out
    assert "interrupted; actors stopped" in out and "Traceback" not in out, out
    # A quiet terminal: TF's native start-up lines of the driver and every actor
    # are filtered (DTR_VERBOSE=1 / --verbose brings them back).
    assert not re.search(r"cuInit|absl::InitializeLog|oneDNN custom operations", out), out
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], \
        [p.info if hasattr(p, "info") else p for p in alive]
    stopped_at = catalog.latest("full").step
    committed_and_sound(storage, "stopped")

    cfg.write_text(cfg.read_text().replace("steps: 100000", f"steps: {stopped_at + 10}"))
    rerun = _job(["--config", str(cfg)], storage, "stopped", ray_tmp)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"resuming run 'stopped' from its full checkpoint at step {stopped_at}" in out, out
    assert (stopped_at + 10, "full") in committed_and_sound(storage, "stopped")
    assert leftovers(storage, "stopped") == []


def test_slow_save_is_waited_for_at_most_half_the_collective_timeout(local_ray, tmp_path):
    """``on_busy: wait`` must not stall rank 0 until the other workers'
    all-reduce times out: past half of ``collective_timeout`` the checkpoint is
    skipped and said so. At the last step the final saves queue behind the
    slow one instead, and are committed."""
    storage = str(tmp_path / "storage")
    os.makedirs(storage)
    with open(os.path.join(storage, "slow_saves.json"), "w") as f:
        json.dump({"10": 14, "35": 4}, f)
    config = make_config(storage, "slow-save", steps=40, log_every=40,
                         collective_timeout=10.0,
                         checkpoint={"serving_every": 5, "full_every": 0,
                                     "on_busy": "wait"})
    lines = []
    summary = trainer.train(config, echo=lines.append,
                            coordinator_cls=SlowSavingCoordinator)
    text = "\n".join(lines)
    assert summary["steps"] == 40 and summary["failures"] == [], text
    skipped = re.findall(r"skipped checkpoint at step (\d+): the previous save was "
                         r"still being written after 5s \(half of collective_timeout",
                         text)
    assert "15" in skipped, text
    keys = committed_and_sound(storage, "slow-save")
    assert (10, "serving") in keys and (35, "serving") in keys, text
    assert (40, "serving") in keys and (40, "full") in keys, text
