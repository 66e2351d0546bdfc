"""What stops an attempt of the worker group, and whether a new group may
cure it.

The attempt classifies what a call into an actor raised (:func:`classify`):
infrastructure faults (an actor died, a collective failed, a peer stalled)
become :class:`GroupFailure`; the user's errors stay themselves. The driver
then asks :class:`FailurePolicy` for a :class:`Decision` and carries it out,
so the policy is a small value tested without Ray or TF.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from distributed.errors import DistributedError, StepError, last_line
from distributed.train.op_errors import INFRASTRUCTURE_ERRORS
from distributed.train.protocol import CoordinatorLostError


class GroupFailure(Exception):
    """The worker group cannot go on (an actor died, a collective failed)."""


class Decision(enum.Enum):
    RESTART = "restart"  # stop every actor; a new group resumes from the last full checkpoint
    RAISE = "raise"  # stop every actor; the job fails with the error


@dataclasses.dataclass(frozen=True)
class FailurePolicy:
    """Restarts the group after infrastructure faults, at most ``max_failures``
    times in a run; never after the user's own op failed (a restart would fail
    the same way).

    Attributes:
        max_failures: Group failures a run survives (the config's key).
    """

    max_failures: int

    def decide(self, failure: GroupFailure | StepError, failed_before: int) -> Decision:
        """What to do about ``failure``, after ``failed_before`` group failures
        earlier in this run (each one restarted)."""
        if isinstance(failure, GroupFailure) and failed_before < self.max_failures:
            return Decision.RESTART
        return Decision.RAISE


def classify(e: BaseException, name: str) -> GroupFailure | None:
    """A :class:`GroupFailure` for faults a restart can cure, else ``None``."""
    import ray
    if isinstance(e, ray.exceptions.RayActorError):
        return GroupFailure(f"{name} died ({last_line(e).split('. ')[0]})")
    if isinstance(e, (ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError,
                      ray.exceptions.NodeDiedError)):
        return GroupFailure(f"{name} was lost ({last_line(e)})")
    cause = getattr(e, "cause", None)
    kinds = {c.__name__ for c in type(cause).__mro__} if cause is not None else set()
    if kinds & INFRASTRUCTURE_ERRORS:
        return GroupFailure(f"{name}'s collective step failed ({type(cause).__name__}: "
                            f"{last_line(cause)}): a peer died or stalled")
    if isinstance(cause, CoordinatorLostError):
        return GroupFailure(f"{name} lost the coordinator ({last_line(cause)})")
    return None


def user_error_among(refs: list, seconds: float = 5.0) -> BaseException | None:
    """The first of ``refs`` to fail with a user error within ``seconds``."""
    import ray
    pending, deadline = list(refs), time.monotonic() + seconds
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:
                if isinstance(unwrap(e), DistributedError):
                    return e
    return None


def unwrap(e: BaseException) -> BaseException:
    """The user error an actor raised, out of Ray's wrapper; else ``e``."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, DistributedError) else e
