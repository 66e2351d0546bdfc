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


# ------------------------------------------------------- a quiet terminal -----

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796514033.452756    7664 port.cc:153] oneDNN custom operations are on.",
    "I0000 00:00:1796514033.453767    7664 cudart_stub.cc:31] Could not find cuda drivers",
    "E0000 00:00:1796514042.822293    7836 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
]
KEPT = [
    "E0000 00:00:1796514042.822293    7836 op_kernel.cc:1830] OP_REQUIRES failed: disk",
    "a line of the user's native library",
]
_NOISY_CHILD = r"""
import logging, os, signal, sys
from distributed import logs
logs.quiet_native_stderr()
logs.setup("r", "driver")
for line in {lines!r}:
    os.write(2, (line + "\n").encode())
print("python stderr line", file=sys.stderr)
logging.getLogger("tensorflow").warning("From x.py:1: f (from y) is deprecated and "
                                        "will be removed in a future version.")
logging.getLogger("distributed.t").warning("our own warning")
if {crash!r}:
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_noisy_child(crash=False, **env):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    code = _NOISY_CHILD.format(lines=NOISE + KEPT, crash=crash)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_native_noise_is_dropped_and_everything_else_kept(monkeypatch):
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    err = _run_noisy_child().stderr
    for line in NOISE:
        assert line not in err
    for line in KEPT + ["python stderr line", "our own warning"]:
        assert line in err, err
    assert "deprecated" not in err, err


def test_verbose_keeps_every_line():
    err = _run_noisy_child(**{logs.VERBOSE_ENV: "1"}).stderr
    for line in NOISE + KEPT + ["python stderr line", "is deprecated and will be removed"]:
        assert line in err, err


def test_a_killed_process_loses_none_of_its_native_lines(monkeypatch):
    """The filter is another process: it reads the pipe to its end after this
    one is killed, so what was written just before a crash is kept."""
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    done = _run_noisy_child(crash=True)
    assert done.returncode == -9
    for line in KEPT:
        assert line in done.stderr, done.stderr
    assert not [line for line in NOISE if line in done.stderr]
