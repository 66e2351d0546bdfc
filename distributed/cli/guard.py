"""The process guard of an entry point: how a job ends when it does not
finish. A user's mistake is one ``error:`` line and exit 2, never a
traceback; Ctrl-C and SIGTERM (``ray job stop``, a scheduler) stop the actors
and say how to resume, exit 130."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

from distributed.errors import DistributedError


def main_guard(fn: Callable[[], int]) -> int:
    """Runs an entry point's ``main``; returns the process's exit code.

    SIGTERM is handled like Ctrl-C: the actors are stopped and the run can be
    resumed. (``ray.init`` installs a SIGTERM handler of its own; the driver
    keeps this one, see :func:`distributed.train.cluster.connect_ray`.)
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return fn()
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; actors stopped. Re-run with the same --run to resume "
              "from the last full checkpoint.", file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
