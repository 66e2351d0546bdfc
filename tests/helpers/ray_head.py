"""A real local Ray head with token authentication, for tests that need `ray job submit`.

`local_ray_head()` runs `ray start --head` in a private temp dir with its own token
and free ports, yields a `RayHead` whose `env` a client subprocess uses
(`ray job submit`, `ray job status`, ...), and tears the head down afterwards.

How token auth is wired (Ray 2.60):
  * The head starts with `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN_PATH=<tmp>/auth_token`
    in its environment. `ray start` never generates a token itself (it fails when
    the mode is `token` and no token is found), so we write one first.
  * Every process the head spawns (raylet, dashboard, workers, the job supervisor,
    and the job's entrypoint) inherits both variables, so a driver inside a job
    authenticates when it calls `ray.init()`; it gets no token of its own.
  * Clients need the same two variables: the Jobs HTTP client only sends the
    `Authorization: Bearer` header when `RAY_AUTH_MODE=token` is set in its own
    process (otherwise: 401 "Missing authentication token").
  * The user's `~/.ray/auth_token` is never read or written: `RAY_AUTH_TOKEN` is
    removed from the environment, because it would take precedence over the path.
  * The head's PATH starts with this interpreter's bin dir, so the `python` that a
    job entrypoint runs is this venv's python, not whatever else is on PATH.

Caveat on teardown: `ray stop` (with or without `--force`) kills every Ray process
on the machine, including other clusters a test session or a user started, so it
is not used. Instead we kill the processes of this head only: those in the session
that `ray start` was launched in (Ray's daemons and workers keep it), those whose
command line names this head's temp dir, and all their descendants (job entrypoints
start their own session but stay children of the job supervisor). SIGTERM first,
SIGKILL after a short grace period. A process that left the session, lost its
parent and never names the temp dir would escape; none of Ray 2.60's does.

Free ports are found by binding to port 0, so a port can in principle be taken
between the check and `ray start`; a collision shows as a start failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["RayHead", "local_ray_head", "ray_cli"]

_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
)


@dataclasses.dataclass(frozen=True)
class RayHead:
    """A running local head.

    Attributes:
        dashboard_url: Jobs API / dashboard address, e.g. `http://127.0.0.1:41234`.
        gcs_address: `host:port` of the GCS, for `ray.init(address=...)`.
        temp_dir: The head's `--temp-dir`; its session logs live under it.
        token_path: File holding this head's auth token.
        env: Full environment for client subprocesses: `RAY_ADDRESS` (the dashboard
            URL, which is what `ray job ...` wants), `RAY_AUTH_MODE=token`,
            `RAY_AUTH_TOKEN_PATH`, and PATH with this venv's bin dir first.
    """

    dashboard_url: str
    gcs_address: str
    temp_dir: Path
    token_path: Path
    env: Mapping[str, str]

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def jobs_api(self, path: str = "") -> object:
        """GET `/api/jobs/<path>` with this head's token; the decoded JSON."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/jobs/{path}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.load(resp)


def ray_cli() -> str:
    """The `ray` executable next to this interpreter (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / "ray"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if found is None:
        raise FileNotFoundError("no `ray` executable next to sys.executable or on PATH")
    return found


@contextlib.contextmanager
def local_ray_head(
    *,
    num_cpus: int = 4,
    object_store_memory: int = 512 * 1024**2,
    extra_args: Sequence[str] = (),
    start_timeout_s: float = 120.0,
    keep_temp_dir: bool = False,
) -> Iterator[RayHead]:
    """Start a token-authenticated Ray head on this machine, yield it, stop it.

    Args:
        num_cpus: Logical CPUs to advertise (may exceed the real cores).
        object_store_memory: Object store size in bytes; small keeps /dev/shm free.
        extra_args: More `ray start` flags.
        start_timeout_s: How long `ray start` plus the Jobs API may take to come up.
        keep_temp_dir: Keep the temp dir (logs) after teardown, for debugging.
    """
    # Short path: Ray puts unix sockets under it (107-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    cmd = [
        ray_cli(), "start", "--head",
        f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={object_store_memory}",
        "--min-worker-port=0", "--max-worker-port=0",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
        *extra_args,
    ]  # fmt: skip
    dashboard_url = f"http://127.0.0.1:{ports['--dashboard-port']}"

    # A new session: every daemon `ray start` spawns keeps this session id, which
    # is how teardown finds them without touching other Ray instances.
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, cwd=temp_dir,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    session_id = proc.pid
    try:
        try:
            out, _ = proc.communicate(timeout=start_timeout_s)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            raise RuntimeError(f"`ray start --head` took over {start_timeout_s}s") from e
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start --head` failed ({proc.returncode}):\n{out}")
        _wait_for_jobs_api(dashboard_url, token_path.read_text(), start_timeout_s)
        gcs_address = _gcs_address(temp_dir) or f"127.0.0.1:{ports['--port']}"
        yield RayHead(
            dashboard_url=dashboard_url,
            gcs_address=gcs_address,
            temp_dir=temp_dir,
            token_path=token_path,
            env={**env, "RAY_ADDRESS": dashboard_url},
        )
    finally:
        _kill_cluster(session_id, str(temp_dir))
        if not keep_temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports that were free a moment ago (all held open while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_jobs_api(url: str, token: str, timeout_s: float) -> None:
    """Block until the Jobs API answers an authenticated request."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(
        f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                json.load(resp)
                return
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = e
            time.sleep(0.5)
    raise RuntimeError(f"Jobs API at {url} not ready after {timeout_s}s: {last}")


def _gcs_address(temp_dir: Path) -> str | None:
    """The GCS address `ray start` recorded for this temp dir, if any."""
    path = temp_dir / "ray_current_cluster"
    if not path.exists():
        return None
    return path.read_text().strip() or None


def _psutil():
    """psutil; Ray vendors it and puts it on sys.path when imported."""
    import ray  # noqa: F401
    import psutil

    return psutil


def _cluster_processes(session_id: int, temp_dir: str) -> list:
    """This head's processes: its session, its temp dir, and their descendants."""
    psutil = _psutil()

    me = os.getpid()
    spared = {me, *(p.pid for p in psutil.Process(me).parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            in_session = os.getsid(p.pid) == session_id
            names_dir = any(temp_dir in arg for arg in p.info["cmdline"] or ())
        except (OSError, psutil.Error):
            continue
        if in_session or names_dir:
            found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update((c.pid, c) for c in p.children(recursive=True))
    return [p for pid, p in found.items() if pid not in spared]


def _kill_cluster(session_id: int, temp_dir: str, grace_s: float = 2.0) -> None:
    """SIGTERM this head's processes, SIGKILL what is left after `grace_s`.

    Signalled all at once, the GCS, raylet and runtime-env agent wait on each other
    and outlive any useful grace period, so the grace is short (`ray stop --force`
    skips it entirely).
    """
    psutil = _psutil()

    for _ in range(3):  # a dying raylet can still spawn a worker; look again
        procs = _cluster_processes(session_id, temp_dir)
        if not procs:
            return
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
