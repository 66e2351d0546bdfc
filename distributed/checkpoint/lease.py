"""Reader leases: retention never deletes a checkpoint a reader is loading.

A reader (the restore job, ``verify``) takes a lease on one checkpoint before
it reads a byte of it and gives it back when done::

    with Lease(run_layout, "serving", 40):
        if (40, "serving") not in catalog.committed_keys():
            ...  # retention got there first: pick another checkpoint
        read it

A lease is a small JSON file ``<run>/leases/<tier>.step-<N>.<random>.json``
holding who took it and until when it is valid (``expires``, Unix seconds). A
background thread extends it every ``ttl / 3`` seconds while the reader works,
so a lease outlives a slow read but not a crashed reader (it lapses ``ttl``
seconds after the last renewal). Nothing in it is executable or pickled.

The writer's side (:meth:`CheckpointStore.apply_retention`) removes the
catalog row first, then checks for live leases: with none it deletes the
directory; with one it leaves the directory and records it as *deferred*
(``<run>/leases/deferred/<tier>.step-<N>``), and a later retention pass (or
the next ``open``) deletes it once the leases are gone. Why this order is
safe: the reader writes its lease *before* it checks that the row still
exists, and the writer removes the row *before* it looks for leases. So either
the reader sees no row (and picks another checkpoint), or the writer sees
the lease (and defers): there is no interleaving in which a reader that
found the row loses the directory under it.

Clocks: ``expires`` is compared with the writer host's clock, so hosts must
agree to well within ``ttl`` (NTP does; the default ttl is 10 minutes).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Callable

from distributed.checkpoint import layout

log = logging.getLogger(__name__)

LEASES_DIR = "leases"
DEFERRED_DIR = "deferred"
DEFAULT_TTL = 600.0


def _key(tier: str, step: int) -> str:
    return f"{layout.check_tier(tier)}.{layout.step_dirname(step)}"


def leases_dir(run_layout: layout.RunLayout) -> str:
    return os.path.join(run_layout.root, LEASES_DIR)


class Lease:
    """A reader's claim on one checkpoint; a context manager.

    Args:
        run_layout: The run.
        tier: The checkpoint's tier.
        step: The checkpoint's step.
        ttl: Seconds the lease stays valid after each renewal.
        clock: Wall clock (tests pass a fake one).
    """

    def __init__(self, run_layout: layout.RunLayout, tier: str, step: int,
                 ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.time):
        if ttl <= 0:
            raise ValueError(f"ttl: expected > 0 seconds, got {ttl!r}")
        self.ttl = ttl
        self._clock = clock
        self.path = os.path.join(leases_dir(run_layout),
                                 f"{_key(tier, step)}.{secrets.token_hex(6)}.json")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        record = {"holder": f"{socket.gethostname()}:{os.getpid()}",
                  "expires": self._clock() + self.ttl}
        layout.atomic_write_bytes(self.path, json.dumps(record).encode())

    def acquire(self) -> "Lease":
        for attempt in range(3):  # another reader's release may remove the dir
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                self._write()
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name="checkpoint-lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._write()
            except OSError as e:  # the lease lapses; retention may then delete
                log.warning("could not renew checkpoint lease %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:  # a reader leaves nothing behind in the run it read
            os.rmdir(os.path.dirname(self.path))
        except OSError:  # other readers' leases are there
            pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_expiry(path: str) -> float | None:
    """The lease file's expiry, or None when it is unreadable or malformed
    (treated as lapsed: a damaged lease must not block deletion forever)."""
    try:
        with open(path, "rb") as f:
            expires = json.loads(f.read(4096)).get("expires")
    except (OSError, ValueError, AttributeError):
        return None
    return float(expires) if isinstance(expires, (int, float)) else None


def live_leases(run_layout: layout.RunLayout, tier: str, step: int,
                now: float | None = None) -> list[str]:
    """Paths of the unexpired leases on one checkpoint."""
    now = time.time() if now is None else now
    prefix = _key(tier, step) + "."
    try:
        names = os.listdir(leases_dir(run_layout))
    except FileNotFoundError:
        return []
    live = []
    for name in names:
        if name.startswith(prefix) and name.endswith(".json"):
            path = os.path.join(leases_dir(run_layout), name)
            expires = _read_expiry(path)
            if expires is not None and expires > now:
                live.append(path)
    return live


def defer_deletion(run_layout: layout.RunLayout, tier: str, step: int) -> None:
    """Records that a retention-deleted checkpoint's directory awaits its readers."""
    directory = os.path.join(leases_dir(run_layout), DEFERRED_DIR)
    os.makedirs(directory, exist_ok=True)
    layout.atomic_write_bytes(os.path.join(directory, _key(tier, step)), b"")


def deferred(run_layout: layout.RunLayout) -> list[tuple[str, int]]:
    """The ``(tier, step)`` of every checkpoint whose deletion was deferred."""
    try:
        names = os.listdir(os.path.join(leases_dir(run_layout), DEFERRED_DIR))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        tier, _, dirname = name.partition(".")
        step = layout.parse_step_dirname(dirname)
        if tier in layout.TIERS and step is not None:
            found.append((tier, step))
    return sorted(found)


def clear_deferred(run_layout: layout.RunLayout, tier: str, step: int) -> None:
    try:
        os.unlink(os.path.join(leases_dir(run_layout), DEFERRED_DIR, _key(tier, step)))
    except FileNotFoundError:
        pass


def remove_lapsed(run_layout: layout.RunLayout, now: float | None = None) -> list[str]:
    """Deletes lease files that expired (their readers crashed); returns them."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(leases_dir(run_layout))
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(leases_dir(run_layout), name)
        if name.endswith(".json"):
            expires = _read_expiry(path)
            if expires is None or expires <= now:
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed
