"""Structured log lines and the terminal status line (no Ray, no TF)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from distributed import logs
from distributed.progress import StatusLine


@pytest.fixture
def fresh_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, dict(logs._context))
    yield root
    for h in list(root.handlers):
        if h not in saved[0]:
            root.removeHandler(h)
    root.setLevel(saved[1])
    logs._context.clear()
    logs._context.update(saved[2])


def test_every_line_names_run_step_and_actor(fresh_logging, monkeypatch, capsys):
    monkeypatch.delenv("DTR_LOG_FORMAT", raising=False)
    logs.setup("exp1", "worker 1")
    logs.setup("exp1", "worker 1")  # idempotent: one handler
    assert sum(h.get_name() == logs._HANDLER_NAME for h in fresh_logging.handlers) == 1
    logs.set_step(120)
    logging.getLogger("distributed.checkpoint.store").info("retention deleted %s", "x")
    line = capsys.readouterr().err.strip()
    assert "INFO run=exp1 step=120 actor=worker 1 distributed.checkpoint.store: " \
           "retention deleted x" in line, line


def test_json_lines_for_log_pipelines(fresh_logging, monkeypatch, capsys):
    monkeypatch.setenv("DTR_LOG_FORMAT", "json")
    logs.setup("exp2", "coordinator")
    logs.set_step(7)
    logging.getLogger("distributed.x").warning("disk %d%% full", 93)
    record = json.loads(capsys.readouterr().err)
    assert record | {"time": None} == {"time": None, "level": "WARNING", "run": "exp2",
                                       "step": 7, "actor": "coordinator",
                                       "logger": "distributed.x",
                                       "message": "disk 93% full"}


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_status_line_draws_on_a_terminal_and_clears_before_output():
    tty = _Tty()
    status = StatusLine(tty, min_interval=0)
    printed = []
    echo = status.wrap(printed.append)
    status.update("training steps 1..50 (3s)")
    assert tty.getvalue() == "\r\x1b[2Ktraining steps 1..50 (3s)"
    echo("step 50/100")
    assert tty.getvalue().endswith("\r\x1b[2K") and printed == ["step 50/100"]


def test_status_line_is_silent_when_not_a_terminal():
    plain = io.StringIO()
    status = StatusLine(plain, min_interval=0)
    status.update("anything")
    status.clear()
    assert plain.getvalue() == "" and not status.live
