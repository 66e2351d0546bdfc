"""Small policy values for checkpointing: when a tier is due, and what a
checkpoint step does while the previous save is still in flight."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CheckpointSchedule:
    """Which tiers are due at a step.

    Attributes:
        serving_every: Serving checkpoint every N steps (0: never, but the last).
        full_every: Full checkpoint every M steps (0: never, but the last).
        last_step: The final step; both tiers are always due there.
    """

    serving_every: int
    full_every: int
    last_step: int

    def due(self, step: int) -> tuple[str, ...]:
        tiers = []
        if step == self.last_step or (self.full_every and step % self.full_every == 0):
            tiers.append("full")
        if step == self.last_step or (self.serving_every
                                      and step % self.serving_every == 0):
            tiers.append("serving")
        return tuple(tiers)

    def run_end(self, step: int, limit: int, steps_per_run: int) -> int:
        """Where a run of up to ``steps_per_run`` steps after ``step`` ends: at
        ``limit`` (the round's end) or the first checkpoint step before it,
        whichever is first, so a snapshot is taken at exactly its step. Every
        worker computes the same ends (their collectives must pair up)."""
        end = min(limit, step + steps_per_run)
        for s in range(step + 1, end):
            if self.due(s):
                return s
        return end


@dataclasses.dataclass(frozen=True)
class BusyPolicy:
    """What a checkpoint step does when a save is still being written.

    ``wait`` blocks training until the previous save commits (no checkpoint is
    lost); ``skip`` drops this checkpoint and trains on (training never waits).
    The last step always waits, so a run ends with its final checkpoints.
    """

    mode: str = "wait"

    def decide(self, in_flight: bool, final: bool) -> str:
        """Returns ``go`` (nothing in flight), ``wait`` or ``skip``."""
        if not in_flight:
            return "go"
        return "wait" if final or self.mode == "wait" else "skip"
