"""The run's TensorBoard scalars: written on the coordinator, published with the run.

Events go to ``<run>/tensorboard/`` in the run's local directory (for an object
store, its staging mirror) and are published through the run's
:class:`~distributed.storage.runstore.RunStore` at most every
:data:`PUBLISH_SECONDS`, and at the end of the run. Metrics must never fail a
save or the run, so every failure here is a warning and a retry later.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Mapping

from distributed.checkpoint.layout import TENSORBOARD_DIR

log = logging.getLogger(__name__)

PUBLISH_SECONDS = 30.0
_EVENT_FILE_PREFIX = "events.out.tfevents."


class RunMetrics:
    """Scalars per step, in the run's TensorBoard event files.

    Args:
        store: The run's store (its local root holds the event files).
        clock: Monotonic seconds; tests pass a fake one.

    NOTE: not thread-safe; the coordinator calls it under its commit lock.
    """

    def __init__(self, store, clock: Callable[[], float] = time.monotonic):
        self._store = store
        self._clock = clock
        self._writer = None
        self._published_at = 0.0
        self._published: dict[str, int] = {}  # event file -> size published

    def record(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes one event of ``scalars`` at ``step``, then publishes the event
        files if :data:`PUBLISH_SECONDS` have passed."""
        from distributed.train.events import EventWriter
        try:
            if self._writer is None:
                self._writer = EventWriter(os.path.join(self._store.layout.root,
                                                        TENSORBOARD_DIR))
            self._writer.scalars(step, scalars)
        except Exception as e:  # metrics must never fail a save or the run
            log.warning("could not write TensorBoard events (%s); retrying with a "
                        "new event file next time", e)
            self._writer = None
        self.publish()

    def publish(self, force: bool = False) -> None:
        """Publishes every event file that grew since (all files of the
        directory, so the last events of a coordinator a failure stopped go
        too); at most every :data:`PUBLISH_SECONDS` unless ``force``."""
        if self._writer is None:
            return
        if not force and self._clock() - self._published_at < PUBLISH_SECONDS:
            return
        self._published_at = self._clock()
        local = os.path.dirname(self._writer.path)
        try:
            for name in sorted(os.listdir(local)):
                size = os.path.getsize(os.path.join(local, name))
                grew = self._published.get(name) != size
                if name.startswith(_EVENT_FILE_PREFIX) and grew:
                    self._store.put_file(f"{TENSORBOARD_DIR}/{name}")
                    self._published[name] = size
        except Exception as e:  # metrics must never fail a save or the run
            log.warning("could not upload the TensorBoard event files (%s); "
                        "retrying later", e)
