"""argparse types shared by the command-line entry points."""

from __future__ import annotations

import argparse
from typing import Callable, TypeVar

from distributed.checkpoint.metric_goal import MetricGoal

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line, like every other error here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (e.g. ``--storage-option endpoint_override=host:9000``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE; use e.g. "
                                         "endpoint_override=localhost:9000")
    return key, value


def number(kind: Callable[[str], T], ok: Callable[[T], bool],
           expected: str) -> Callable[[str], T]:
    """An argparse type: ``kind(text)`` if ``ok`` of it, else a usage error
    saying what was ``expected``."""
    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def metric_mode(text: str) -> str:
    """``METRIC``, ``METRIC:min`` or ``METRIC:max``, checked at parse time by
    :meth:`MetricGoal.parse` (the grammar's one home) and returned as given."""
    try:
        MetricGoal.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
