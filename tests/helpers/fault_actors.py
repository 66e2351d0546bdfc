"""Actor classes for fault tests, imported by Ray actors (so not a test file)."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import psutil

from distributed.train.coordinator import Coordinator
from distributed.train.worker import Worker

WORKER_PIDS_DIR = "worker_pids"


def worker_pids_dir(storage_path: str) -> str:
    """Where :class:`PidRecordingWorker` records its process ids."""
    return os.path.join(storage_path, WORKER_PIDS_DIR)


class PidRecordingWorker(Worker):
    """A worker that records its process id once set up, so a fault test
    kills this run's own workers and never another Ray's (other test
    sessions on the machine run ``ray::Worker`` processes too).

    ``<storage>/worker_pids/rank-<r>`` holds the pid of rank ``r`` of the
    latest group (a restarted group overwrites it).
    """

    def setup(self, *args, **kwargs):
        result = super().setup(*args, **kwargs)
        directory = worker_pids_dir(self.config.storage_path)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank-{self.rank}")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
        return result


class CrashingCoordinator(Coordinator):
    """A coordinator whose process dies (``os._exit``) at commit-protocol phases.

    The phases still to crash at are kept in ``<storage>/crash_plan.json`` (a
    list, consumed front first, one crash per coordinator process), so the
    coordinators of the restarted groups crash at the next phases in turn.
    """

    def __init__(self, config_dict, restarting: bool = False):
        super().__init__(config_dict, restarting)
        self._plan_path = os.path.join(self.config.storage_path, "crash_plan.json")
        self.store._on_phase = self._maybe_die

    def _maybe_die(self, phase: str) -> None:
        with open(self._plan_path) as f:
            plan = json.load(f)
        if plan and plan[0] == phase:
            with open(self._plan_path, "w") as f:
                json.dump(plan[1:], f)
                f.flush()
                os.fsync(f.fileno())
            os._exit(1)


class SlowSavingCoordinator(Coordinator):
    """A coordinator whose saves of some steps take long (slow storage).

    ``<storage>/slow_saves.json`` maps a step to the seconds its save sleeps
    before writing.
    """

    def save(self, step, tier, values, metrics, position=None, **kwargs):
        import time
        path = os.path.join(self.config.storage_path, "slow_saves.json")
        with open(path) as f:
            delay = json.load(f).get(str(step), 0)
        time.sleep(delay)
        return super().save(step, tier, values, metrics, position, **kwargs)


class FailingSaveCoordinator(Coordinator):
    """A coordinator whose saves of chosen checkpoints fail like a full disk.

    ``<storage>/fail_saves.json`` lists ``[tier, step]`` pairs; the save of
    each fails once (``OSError(ENOSPC)`` after the tensors are written) and is
    taken off the list, so a restarted coordinator does not fail it again.
    """

    def __init__(self, config_dict, restarting: bool = False):
        super().__init__(config_dict, restarting)
        self._plan_path = os.path.join(self.config.storage_path, "fail_saves.json")
        self._saving: tuple[str, int] | None = None
        self.store._on_phase = self._maybe_fail
        real_save = self.store.save

        def save(writer, sess, step, tier, *args, **kwargs):
            self._saving = (tier, step)
            try:
                return real_save(writer, sess, step, tier, *args, **kwargs)
            finally:
                self._saving = None

        self.store.save = save

    def _maybe_fail(self, phase: str) -> None:
        if phase != "tensors_written" or self._saving is None:
            return
        with open(self._plan_path) as f:
            plan = [tuple(p) for p in json.load(f)]
        if self._saving in plan:
            plan.remove(self._saving)
            with open(self._plan_path, "w") as f:
                json.dump(plan, f)
            import errno
            raise OSError(errno.ENOSPC, "No space left on device (injected)")


def own_worker_pids(storage: str) -> list[int]:
    """The live worker processes of this test's run, as
    :class:`~tests.helpers.fault_actors.PidRecordingWorker` recorded them, and only
    those that descend from this test process (its own local Ray): never a
    ``ray::`` process of another Ray on the machine."""
    directory = worker_pids_dir(storage)
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    pids = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        with open(os.path.join(directory, name)) as f:
            pid = int(f.read())
        if pid in ours:
            pids.append(pid)
    return pids


class Killer:
    """Sends ``sig`` to one of this run's own workers at a random moment of
    the next round, from a thread. :meth:`check` joins the thread and
    re-raises in the test whatever failed in it (an ``assert`` included)."""

    def __init__(self, storage: str, rng: random.Random, sig=signal.SIGKILL):
        self.victim: int | None = None
        self._error: BaseException | None = None

        def kill():
            try:
                time.sleep(rng.uniform(0.05, 0.3))  # when in the round: random
                victims = own_worker_pids(storage)
                assert victims, (f"no live worker of this run recorded under "
                                 f"{worker_pids_dir(storage)}")
                self.victim = rng.choice(victims)
                os.kill(self.victim, sig)
            except BaseException as e:  # noqa: BLE001 - re-raised by check()
                self._error = e

        self._thread = threading.Thread(target=kill, daemon=True)
        self._thread.start()

    def check(self) -> int:
        """Returns the pid signalled; raises what went wrong in the thread."""
        self._thread.join(60)
        assert not self._thread.is_alive(), "the killer thread hung"
        if self._error is not None:
            raise self._error
        return self.victim
