"""Structured logs: every line names the run, the step and the actor.

Each process (driver, coordinator, worker) calls :func:`setup` once with its
run and actor name, and :func:`set_step` as training advances; every record of
every logger then carries ``run``, ``step`` and ``actor``::

    2026-11-24 19:40:01,123 INFO run=digits-cnn step=120 actor=coordinator
        distributed.checkpoint.store: retention deleted serving checkpoint at step 20

With ``DTR_LOG_FORMAT=json`` (in the environment of the driver; actors inherit
it) each line is one JSON object with the same fields, for log pipelines.
"""

from __future__ import annotations

import json
import logging
import os
import sys

_context = {"run": "-", "step": "-", "actor": "-"}
_HANDLER_NAME = "distributed-structured"
TEXT_FORMAT = ("%(asctime)s %(levelname)s run=%(run)s step=%(step)s actor=%(actor)s "
               "%(name)s: %(message)s")


class _ContextFilter(logging.Filter):
    """Stamps the process's run, step and actor on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (so a
    replaced or captured stderr never leaves it writing to a closed file)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname,
               "run": record.run, "step": record.step, "actor": record.actor,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(run: str, actor: str, level: int = logging.INFO) -> None:
    """Configures this process's root logger once (idempotent per process).

    Args:
        run: The run name.
        actor: ``driver``, ``coordinator`` or ``worker <rank>``.
        level: The level of our own ``distributed.*`` loggers.
    """
    _context.update(run=run, actor=actor)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.addFilter(_ContextFilter())
        root.addHandler(handler)
    json_format = os.environ.get("DTR_LOG_FORMAT", "text").lower() == "json"
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    logging.getLogger("distributed").setLevel(level)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)


def set_step(step: int) -> None:
    """The step every following record of this process carries."""
    _context["step"] = step


def context() -> dict:
    """A copy of the current run/step/actor fields."""
    return dict(_context)
