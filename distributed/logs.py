"""Structured logs: every line names the run, the step and the actor.

Each process (driver, coordinator, worker) calls :func:`setup` once with its
run and actor name, and :func:`set_step` as training advances; every record of
every logger then carries ``run``, ``step`` and ``actor``::

    2026-11-24 19:40:01,123 INFO run=digits-cnn step=120 actor=coordinator
        distributed.checkpoint.store: retention deleted serving checkpoint at step 20

With ``DTR_LOG_FORMAT=json`` (in the environment of the driver; actors inherit
it) each line is one JSON object with the same fields, for log pipelines.

:func:`quiet_native_stderr` keeps what TensorFlow's C++ runtime writes to the
process's stderr before its log level takes effect (oneDNN and CUDA-stub info
lines, ``failed call to cuInit`` on a machine without a GPU) off the terminal;
``DTR_VERBOSE=1`` (``--verbose``) keeps everything.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

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


VERBOSE_ENV = "DTR_VERBOSE"

# Lines TensorFlow's C++ runtime writes to fd 2 that need no action: absl's
# notice, INFO/WARNING lines written before TF_CPP_MIN_LOG_LEVEL applies, and
# the CUDA probe's errors on a machine without a GPU. Other errors stay.
_NATIVE_NOISE = (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"^[IW][0-9]{4} [0-9:.]+ +[0-9]+ [^ ]+:[0-9]+\] ",
    r"^E[0-9]{4} [0-9:.]+ +[0-9]+ [^ ]+:[0-9]+\] (failed call to cuInit|"
    r"Unable to register cu(DNN|FFT|BLAS) factory)",
    r"^To enable the following instructions: .*rebuild TensorFlow with the "
    r"appropriate compiler flags",
)
# Python log records with nothing to act on: (logger, text in the message).
_PYTHON_NOISE = (
    # Ray's per-start notice that token authentication is on (README: Security).
    ("ray._private.authentication.authentication_token_setup",
     "Token authentication is enabled for this Ray cluster"),
    # TensorFlow's deprecation notices for the v1 APIs a graph-mode model uses
    # (tf_keras's batch norm calls _colocate_with, ...).
    ("tensorflow", "is deprecated and will be removed"),
)
_filter: subprocess.Popen | None = None


def verbose() -> bool:
    """Whether ``DTR_VERBOSE`` asks for every line (``1``, ``true``, ``yes``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


class _DropRecord(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self._text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self._text not in record.getMessage()


def quiet_native_stderr(replace_any: bool = False) -> None:
    """Filters the native noise out of this process's fd 2, and a few Python
    log records that need no action out of its logs (no-op when verbose).

    File descriptor 2 becomes a pipe into ``grep -v`` (a child process in its
    own session, so Ctrl-C does not end it first), which writes every other
    line to where fd 2 went. Because the filter is a separate process, a
    crash of this one loses nothing: the filter reads to the end of the pipe.
    Python's own ``sys.stderr`` writes straight to the original destination,
    so our log lines are never delayed and a terminal stays a terminal (the
    status line). Call it before TensorFlow is imported; idempotent. Nothing
    changes where ``sys.stderr`` was replaced (a test's capture, an embedding
    application): that stream is not ours to reroute, unless ``replace_any``
    (a Ray actor, whose ``sys.stderr`` Ray wraps to write through to fd 2).
    """
    global _filter
    if (_filter is not None or verbose() or os.name != "posix"
            or (sys.stderr is not sys.__stderr__ and not replace_any)):
        return
    for name, text in _PYTHON_NOISE:
        logging.getLogger(name).addFilter(_DropRecord(text))
    # Keras 2's own deprecation warnings for the v1 layers a graph-mode model
    # uses (`tf.layers.dense` is deprecated ..., `layer.add_variable` is
    # deprecated ...): nothing to act on here.
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"`[\w.]+` is deprecated and will be removed")
    grep = shutil.which("grep")
    if grep is None:
        return
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read, write = os.pipe()
        try:
            _filter = subprocess.Popen(
                [grep, "--line-buffered", "-v", "-E", "|".join(_NATIVE_NOISE)],
                stdin=read, stdout=original, stderr=original, start_new_session=True)
        finally:
            os.close(read)
        python_stderr = io.TextIOWrapper(
            io.FileIO(os.dup(original), "w"), encoding=getattr(sys.stderr, "encoding", None),
            errors="backslashreplace", line_buffering=True, write_through=True)
        os.dup2(write, 2)
        os.close(write)
    except OSError:  # no pipe, no process: keep the noise rather than fail
        return
    sys.stderr = python_stderr
    atexit.register(_stop_filter, original)


def _stop_filter(original: int) -> None:
    """At exit: fd 2 back to its destination (closing the pipe), then let the
    filter write what it still holds."""
    try:
        os.dup2(original, 2)
        if _filter is not None:
            _filter.wait(timeout=2)
    except (OSError, subprocess.TimeoutExpired):
        pass


def in_ray_actor() -> bool:
    """Whether this process is a Ray actor (not a driver or a test process)."""
    if "ray" not in sys.modules:
        return False
    import ray
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def setup_actor(run: str, actor: str) -> None:
    """:func:`setup` for an actor (warnings and errors only unless verbose);
    inside a real Ray actor (not when a test builds the class in its own
    process) also :func:`quiet_native_stderr`."""
    if in_ray_actor():
        quiet_native_stderr(replace_any=True)
    # An actor's INFO records (retention deleted a checkpoint, a leftover was
    # removed) repeat the job's own lines once Ray forwards them to the
    # driver; they show with --verbose.
    setup(run, actor, logging.INFO if verbose() else logging.WARNING)
