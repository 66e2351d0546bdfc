"""Retention policies: small values that decide, a manager that deletes.

Each rule looks at the committed checkpoints of one tier and returns the keys
it wants kept. A :class:`Retention` keeps a checkpoint if *any* of its rules
keeps it (no rules: keep everything), and always keeps the newest checkpoint of
each tier. Deciding is pure; :meth:`CheckpointStore.apply_retention` carries the
decision out, deleting the catalog row before the data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from distributed.checkpoint.catalog import CatalogEntry
from distributed.checkpoint.metric_goal import MODES, MetricGoal, MetricMode
from distributed.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class KeepLastN:
    """Keep the ``n`` newest checkpoints."""

    n: int

    def __post_init__(self):
        _positive_int(self.n, "keep_last")

    def keep(self, entries: Sequence[CatalogEntry]) -> set[int]:
        return {e.step for e in sorted(entries, key=lambda e: e.step)[-self.n:]} \
            if self.n > 0 else set()

    def to_dict(self) -> dict[str, Any]:
        return {"keep_last": self.n}


@dataclasses.dataclass(frozen=True)
class KeepEveryKSteps:
    """Keep checkpoints whose step is a multiple of ``k`` (long-term history)."""

    k: int

    def __post_init__(self):
        _positive_int(self.k, "keep_every")

    def keep(self, entries: Sequence[CatalogEntry]) -> set[int]:
        return {e.step for e in entries if e.step % self.k == 0}

    def to_dict(self) -> dict[str, Any]:
        return {"keep_every": self.k}


@dataclasses.dataclass(frozen=True)
class KeepBestN:
    """Keep the ``n`` best checkpoints by a recorded metric (``min`` or ``max``).

    Checkpoints that do not record the metric are not kept by this rule.
    """

    n: int
    metric: str
    mode: MetricMode = "min"

    def __post_init__(self):
        _positive_int(self.n, "keep_best.n")
        object.__setattr__(self, "_goal", MetricGoal(self.metric, self.mode))

    def keep(self, entries: Sequence[CatalogEntry]) -> set[int]:
        return {e.step for e in self._goal.ranked(entries)[:self.n]}

    def to_dict(self) -> dict[str, Any]:
        return {"keep_best": {"n": self.n, "metric": self.metric, "mode": self.mode}}


@dataclasses.dataclass(frozen=True)
class Retention:
    """A set of rules; a checkpoint survives if any rule keeps it.

    Attributes:
        rules: The rules. Empty keeps every checkpoint.
    """

    rules: tuple[Any, ...] = ()

    def plan(self, entries: Iterable[CatalogEntry]) -> list[CatalogEntry]:
        """Returns the entries to delete, oldest first. Pure: no I/O."""
        by_tier: dict[str, list[CatalogEntry]] = {}
        for e in entries:
            by_tier.setdefault(e.tier, []).append(e)
        doomed = []
        for tier_entries in by_tier.values():
            if not self.rules:
                continue
            kept = {max(e.step for e in tier_entries)}  # never the newest
            for rule in self.rules:
                kept |= rule.keep(tier_entries)
            doomed += [e for e in tier_entries if e.step not in kept]
        return sorted(doomed, key=lambda e: (e.step, e.tier))

    def to_dict(self) -> dict[str, Any]:
        """The config form that :meth:`from_dict` reads back (``{}``: keep all)."""
        return {key: value for rule in self.rules for key, value in rule.to_dict().items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, field: str = "retention"
                  ) -> "Retention":
        """From config: ``{keep_last: 5, keep_every: 1000, keep_best: {n: 3,
        metric: loss, mode: min}}``; any subset."""
        if d is not None and not isinstance(d, Mapping):
            raise ConfigError(f"{field}: expected a mapping such as {{keep_last: 5}}, "
                              f"got {d!r}")
        d = dict(d or {})
        unknown = set(d) - {"keep_last", "keep_every", "keep_best"}
        if unknown:
            raise ConfigError(f"{field}: unknown key(s) {sorted(unknown)}; valid "
                              "keys are keep_last, keep_every, keep_best")
        rules: list[Any] = []
        if d.get("keep_last") is not None:
            rules.append(KeepLastN(_positive_int(d["keep_last"], f"{field}.keep_last")))
        if d.get("keep_every") is not None:
            rules.append(KeepEveryKSteps(
                _positive_int(d["keep_every"], f"{field}.keep_every")))
        if d.get("keep_best") is not None:
            best = d["keep_best"]
            if not isinstance(best, Mapping) or "metric" not in best:
                raise ConfigError(f"{field}.keep_best: expected {{n, metric, mode}}, "
                                  f"got {best!r}")
            extra = set(best) - {"n", "metric", "mode"}
            if extra:
                raise ConfigError(f"{field}.keep_best: unknown key(s) {sorted(extra)}")
            mode = best.get("mode", "min")
            if mode not in MODES:
                raise ConfigError(f"{field}.keep_best.mode: {mode!r} is not valid; "
                                  "use min or max")
            if not isinstance(best["metric"], str) or not best["metric"]:
                raise ConfigError(f"{field}.keep_best.metric: expected a metric name")
            rules.append(KeepBestN(_positive_int(best.get("n", 1),
                                                 f"{field}.keep_best.n"),
                                   best["metric"], mode))
        return cls(tuple(rules))


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}: expected a positive integer, got {value!r}")
    return value
