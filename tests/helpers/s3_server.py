"""A real S3-compatible server (``moto_server``) on loopback, for tests and benches.

``moto_server`` runs as a subprocess on a free 127.0.0.1 port; nothing is
mocked in-process. Use it from a test module::

    @pytest.fixture(scope="module")
    def s3():
        with s3_server.running() as server:   # skips the module if it cannot start (fails under CI)
            yield server

:class:`LinkCutter` sits between a client and the server and drops chosen
requests, so tests can fail an upload at an exact point while the server (and
its state) lives on.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


class S3ServerUnavailable(RuntimeError):
    """``moto_server`` could not be started here."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """One ``moto_server`` process; its state lives in its memory only.

    Args:
        recording: If set, the server appends every request it receives (before
            acting on it) to this file as a JSON line: a record of what reached
            it that outlives the process.
    """

    def __init__(self, recording: str | None = None, timeout: float = 30.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.recording = recording
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
        if recording:
            env.update(MOTO_ENABLE_RECORDING="True", MOTO_RECORDER_FILEPATH=recording)
        self._log = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                 "-p", str(self.port)], env=env, stdout=self._log,
                stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise S3ServerUnavailable(f"cannot run moto.server: {e}") from e
        self._wait_until_up(timeout)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.seek(0)
                raise S3ServerUnavailable(
                    f"moto.server exited with {self.process.returncode}: "
                    f"{self._log.read()[-2000:].decode(errors='replace')}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise S3ServerUnavailable(f"moto.server did not answer within {timeout:.0f} s")

    def options(self, **extra) -> dict:
        """``S3FileSystem`` arguments that reach this server."""
        return {"endpoint_override": self.endpoint, "access_key": ACCESS_KEY,
                "secret_key": SECRET_KEY, "region": REGION, **extra}

    def env(self) -> dict:
        """The environment variables that reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}

    def filesystem(self):
        """A plain ``S3FileSystem`` straight to the server, to inspect its state."""
        import pyarrow.fs as pafs
        return pafs.S3FileSystem(**self.options(allow_bucket_creation=True,
                                                allow_bucket_deletion=True))

    def make_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def objects(self, bucket: str) -> dict[str, int]:
        """``{key: size}`` of every object in ``bucket`` (directory markers too)."""
        import pyarrow.fs as pafs
        infos = self.filesystem().get_file_info(pafs.FileSelector(bucket, recursive=True))
        return {i.path[len(bucket) + 1:]: i.size for i in infos
                if i.type == pafs.FileType.File}

    def kill(self) -> None:
        """SIGKILLs the server: in-flight requests fail, its state is gone."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@contextlib.contextmanager
def running(skip: bool = True, **kwargs):
    """A started :class:`S3Server`, stopped on exit. With ``skip``, a server
    that cannot start skips the calling test (module, for module fixtures),
    except under CI (``CI=true``), where it fails it: the project's own dev
    install provides moto[server], so a missing one is a broken setup."""
    try:
        server = S3Server(**kwargs)
    except S3ServerUnavailable as e:
        if not skip:
            raise
        from tests.conftest import skip_or_fail_in_ci
        skip_or_fail_in_ci(f"moto_server (pip install 'moto[server]') cannot start: {e}")
    try:
        yield server
    finally:
        server.stop()


class LinkCutter:
    """A loopback TCP proxy to ``upstream_port`` that can fail one request.

    :meth:`cut_at` arms it: the next request whose bytes contain ``pattern``
    is either dropped unsent (``deliver=False``) or delivered with its reply
    dropped (``deliver=True``); either way that connection is closed and (with
    ``stay_down``), from then until :meth:`restore`, every connection is closed
    at once: the link is down, the server and its state live on.
    """

    def __init__(self, upstream_port: int):
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._pattern: bytes | None = None
        self._deliver = False
        self._stay_down = True
        self.down = False
        self.fired = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_at(self, pattern: bytes, deliver: bool = False,
               stay_down: bool = True) -> None:
        with self._lock:
            self._pattern, self._deliver, self._stay_down = pattern, deliver, stay_down
            self.fired.clear()

    def restore(self) -> None:
        with self._lock:
            self._pattern, self.down = None, False

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                server = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        """Relays both ways on one thread until either side closes or a cut."""
        swallow_reply = False
        try:
            while (not self.down and not self._closed) or swallow_reply:
                ready, _, _ = select.select([client, server], [], [], 0.2)
                if client in ready:
                    data = client.recv(1 << 20)
                    if not data:
                        return
                    with self._lock:
                        hit = self._pattern is not None and self._pattern in data
                        if hit:
                            self._pattern, self.down = None, self._stay_down
                            self.fired.set()
                    if hit and not self._deliver:
                        return
                    swallow_reply = swallow_reply or hit
                    server.sendall(data)
                if server in ready:
                    data = server.recv(1 << 20)
                    interim = data.startswith(b"HTTP/1.1 100 ")  # Expect: 100-continue
                    if not data or (swallow_reply and not interim):
                        return  # the request was served; its reply is lost
                    client.sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

