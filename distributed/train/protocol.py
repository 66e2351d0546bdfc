"""What the driver, the coordinator and the workers say to each other: typed
values, not dicts (they cross Ray by pickling, so plain dataclasses).

- :class:`BuildPlan`: the coordinator built the chief graph (``Coordinator.build``).
- :class:`OpenedRun`: it opened the run's storage and initialized or resumed
  (``Coordinator.open_run``).
- :class:`WorkerSetup`: a worker built its graph (``Worker.setup``).
- :class:`CheckpointEvent`: something happened to a checkpoint (rank 0's
  hand-offs, the coordinator's evaluations); :meth:`CheckpointEvent.describe`
  is the line the job prints for it.
- :class:`RoundReport`: rank 0's report of a round of steps (``Worker.train``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# CheckpointEvent kinds.
COMMITTED = "committed"      # a checkpoint committed (or written, evaluation pending)
SKIPPED = "skipped"          # a due checkpoint not taken (the previous one in flight)
FAILED = "failed"            # a save failed; training goes on
EVAL_SKIPPED = "eval_skipped"  # committed without eval metrics: evaluation was behind
EVAL_FAILED = "eval_failed"  # committed without eval metrics: evaluation failed
EARLY_STOP = "early_stop"    # eval.stop_when says stop
KINDS = (COMMITTED, SKIPPED, FAILED, EVAL_SKIPPED, EVAL_FAILED, EARLY_STOP)

# The coordinator's concurrency group (a thread beside its one-at-a-time
# methods) that workers hand their input positions in, while a save waits.
POSITIONS_GROUP = "positions"


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """The chief graph and what its checkpoints hold (nothing written yet)."""

    input_spec: Any
    serving_names: list  # the variables rank 0 hands over for serving checkpoints
    num_variables: int
    warnings: list
    serving_bytes: int
    full_bytes: int
    serving_tensors: int  # logical tensors (a partitioned variable is one)
    full_tensors: int


@dataclasses.dataclass(frozen=True)
class OpenedRun:
    """Where training starts, after the run's storage was opened."""

    start_step: int
    resumed_from: int | None  # the full checkpoint's step, or None: initial values
    recreated_serving: int | None  # a serving checkpoint a failure lost, re-made
    # ... or to be re-made by rank 0 once it has restored the parameter servers
    remake_serving: int | None
    warnings: list
    removed: list  # leftovers of interrupted saves, removed


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """A worker's graph is built: its process and the input spec it read."""

    pid: int
    input_spec: Any


class CoordinatorLostError(RuntimeError):
    """Rank 0 found the coordinator dead; the trainer restarts the group."""


@dataclasses.dataclass(frozen=True)
class CheckpointEvent:
    """One thing that happened to a checkpoint.

    Attributes:
        kind: One of :data:`KINDS`.
        step: The checkpoint's step.
        tier: ``serving`` or ``full`` (``None`` where it does not apply).
        entry: The catalog entry (``CatalogEntry.to_json_dict()``) of a commit.
        evaluating: Written, evaluated next, then committed with its metrics.
        already_committed: Committed before a restart; kept.
        retention_deleted: Steps retention deleted after this commit.
        tiers: The tiers a skip or failure concerns.
        reason: Why (a skip's reason, an early stop's rule).
        error: A failure's message.
    """

    kind: str
    step: int | None = None
    tier: str | None = None
    entry: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    evaluating: bool = False
    already_committed: bool = False
    retention_deleted: tuple = ()
    tiers: tuple = ()
    reason: str | None = None
    error: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")

    @classmethod
    def committed(cls, entry: Mapping[str, Any], **fields) -> "CheckpointEvent":
        """A commit of ``entry`` (a catalog entry's JSON dict)."""
        return cls(COMMITTED, entry["step"], entry["tier"], dict(entry), **fields)

    @property
    def metrics(self) -> Mapping[str, float]:
        return self.entry.get("metrics", {})

    def describe(self) -> str:
        """The line the job prints for it."""
        if self.kind == COMMITTED:
            return self._describe_commit()
        if self.kind == EVAL_SKIPPED:
            return (f"  skipped evaluating step {self.step}: evaluation was behind, "
                    "a newer checkpoint is next (committed without eval metrics)")
        if self.kind == EVAL_FAILED:
            return (f"  evaluation of step {self.step} FAILED: {self.error} "
                    "(committed without eval metrics; training goes on)")
        if self.kind == SKIPPED:
            reason = self.reason or ("the previous save was still in flight "
                                     "(checkpoint.on_busy: skip)")
            return f"  skipped checkpoint at step {self.step}: {reason}"
        if self.kind == EARLY_STOP:
            return f"  early stop after step {self.step}: {self.reason}"
        return f"  checkpoint save FAILED: {self.error} (training goes on)"

    def _describe_commit(self) -> str:
        entry = self.entry
        if self.evaluating:
            return (f"  wrote serving checkpoint at step {self.step} "
                    f"({entry['num_bytes'] / 2**20:.2f} MiB); evaluating it, then it "
                    "commits with its metrics")
        if self.already_committed:
            return (f"  kept the {self.tier} checkpoint at step {self.step} "
                    "committed before the restart")
        deleted = (f", retention deleted steps {list(self.retention_deleted)}"
                   if self.retention_deleted else "")
        evals = sorted((k, v) for k, v in self.metrics.items() if k.startswith("eval/"))
        if evals:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in evals)
            return f"  committed {self.tier} checkpoint at step {self.step} ({shown}{deleted})"
        return (f"  committed {self.tier} checkpoint at step {self.step} "
                f"({entry['num_bytes'] / 2**20:.2f} MiB, {entry['num_shards']} shard(s), "
                f"{entry['save_seconds']:.2f}s{deleted})")


@dataclasses.dataclass(frozen=True)
class RoundReport:
    """Rank 0's report of one round of steps (every worker ends it together)."""

    step: int
    loss: float | None  # the mean training loss of the round's steps
    steps_per_sec: float
    learning_rate: float | None = None  # the rate the round's last step used
    events: tuple = ()  # CheckpointEvents since the last report (rank 0)
    stall_seconds: float | None = None  # rank 0's checkpointing stall, in total
    # Measurements an instrumented worker adds (the benchmarks' timings).
    extra: dict = dataclasses.field(default_factory=dict)
