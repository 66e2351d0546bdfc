"""Actor classes for fault tests, imported by Ray actors (so not a test file)."""

from __future__ import annotations

import json
import os

from distributed.train.coordinator import Coordinator


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

    def save(self, step, tier, values, metrics):
        import time
        path = os.path.join(self.config.storage_path, "slow_saves.json")
        with open(path) as f:
            delay = json.load(f).get(str(step), 0)
        time.sleep(delay)
        return super().save(step, tier, values, metrics)
