"""A metric and which way is better: the one home of "best by a metric".

Retention (``keep_best``), the catalog's :meth:`~Catalog.best`, the restore
job's ``--best`` and early stopping all rank checkpoints this way, so they
agree on what "best" means, ties included: between equal values the newest
step wins (it has trained longest).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Iterable, Literal, Mapping, Protocol, TypeVar

from distributed.errors import ConfigError

MetricMode = Literal["min", "max"]
MODES: tuple[str, ...] = typing.get_args(MetricMode)


class Scored(Protocol):
    """What ranking reads of a checkpoint (a :class:`CatalogEntry` has both)."""

    step: int
    metrics: Mapping[str, float]


S = TypeVar("S", bound=Scored)


@dataclasses.dataclass(frozen=True)
class MetricGoal:
    """A recorded metric and whether lower (``min``) or higher (``max``) is better.

    Attributes:
        metric: The metric's name as recorded (``loss``, ``eval/accuracy``).
        mode: ``min`` or ``max``.
    """

    metric: str
    mode: MetricMode = "min"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not valid: use 'min' or 'max'")

    @classmethod
    def parse(cls, text: str) -> "MetricGoal":
        """The command line's form: ``METRIC``, ``METRIC:min`` or ``METRIC:max``.

        Raises:
            ConfigError: Any other form (the message shows the valid ones).
        """
        metric, _, mode = text.partition(":")
        if not metric or mode not in ("", *MODES):
            raise ConfigError(f"{text!r} is not METRIC[:min|max]; use e.g. loss or "
                              "accuracy:max")
        return cls(metric, mode or "min")

    def better(self, value: float, than: float) -> bool:
        """Whether ``value`` strictly improves on ``than``."""
        return value < than if self.mode == "min" else value > than

    def ranked(self, entries: Iterable[S]) -> list[S]:
        """The entries that record the metric, best first (ties: newest first);
        entries without it are left out, as nothing says how good they are."""
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted((e for e in entries if self.metric in e.metrics),
                      key=lambda e: (sign * e.metrics[self.metric], -e.step))
