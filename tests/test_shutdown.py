"""`pdserve up` stops everything it started however its terminal ends: SIGHUP (terminal closed), SIGTERM,
SIGINT (Ctrl-C), a closed stdout pipe (`pdserve up | head -1`), and a signal while it is still starting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.process_scan import marked_env, marked_processes, wait_none_left

PDSERVE = str(Path(sys.executable).parent / "pdserve")


def _start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([PDSERVE, "up", "--port", "0", "--http-port", "0", "--router-processes", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=env)


def _read_until(proc: subprocess.Popen[str], text: str, timeout_s: float = 240.0) -> str:
    """The first line of `proc`'s stdout with `text` in it."""
    end = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        if text in line:
            return line
        assert time.monotonic() < end, f"no {text!r} in time"
    raise AssertionError(f"pdserve up ended before {text!r}: {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGHUP", "SIGTERM", "SIGINT", "pipe", "SIGTERM-while-starting"])
def test_up_leaves_nothing_behind(how: str) -> None:
    env, mark = marked_env()
    proc = _start(env)
    try:
        redis_line = _read_until(proc, "started redis-server at ")
        redis = "redis-server " + redis_line.split("started redis-server at ")[1].split()[0]  # its title: host:port
        assert marked_processes(mark, cmdline=redis)
        if how == "SIGTERM-while-starting":
            proc.send_signal(signal.SIGTERM)
        else:
            _read_until(proc, "serving on")
            running = marked_processes(mark).values()
            assert any("cluster.worker.frontend" in cmd for cmd in running), running  # the scan sees workers' children
            if how == "pipe":
                assert proc.stdout is not None
                proc.stdout.close()  # as `head -1` exiting
            else:
                proc.send_signal(getattr(signal, how))
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, 130), proc.stderr.read() if proc.stderr else ""
    left = wait_none_left(mark) | wait_none_left(mark, cmdline=redis)
    assert not left, f"left running after {how}: {left}"
