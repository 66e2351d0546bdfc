"""What a caller that drives :func:`distributed.train.trainer.train` from
another system (Ray Tune's trials, :mod:`distributed.tune`) may add to a run:
Ray options for the actors, a look at each checkpoint event, and a way to end
the run early. The defaults change nothing: ``jobs.train`` runs without hooks.
"""

from __future__ import annotations

from typing import Any

from distributed.train.protocol import CheckpointEvent


class RunHooks:
    """No-op hooks; subclasses override what they need.

    NOTE: every method runs on the driver's thread, between rounds of steps
    (the workers wait), so a slow hook slows the run.
    """

    def actor_options(self, rank: int | None) -> dict[str, Any]:
        """Extra Ray options of worker ``rank`` (the coordinator's: ``None``),
        e.g. the placement group bundle it must run in."""
        return {}

    def server_options(self, task: int) -> dict[str, Any]:
        """Extra Ray options of parameter server ``task``."""
        return {}

    def on_event(self, event: CheckpointEvent) -> str | None:
        """Called with each checkpoint event the job prints; a returned reason
        ends the run after this round, as ``eval.stop_when`` does: the saves in
        flight commit and the evaluations finish before the actors stop."""
        return None

    def stop_reason(self) -> str | None:
        """Polled after every round: a reason ends the run as :meth:`on_event`'s does."""
        return None
