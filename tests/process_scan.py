"""Find every process a test's command started, wherever it was reparented: each inherits a marker in its
environment (Ray's raylet, its workers and their children inherit the driver's), which /proc shows.
redis-server rewrites its environment (its process title), so it is found by its command line."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

MARK = "PDSERVE_TEST_MARK"


def marked_env(**extra: str) -> tuple[dict[str, str], str]:
    """os.environ plus a fresh marker (and `extra`); returns (env, marker)."""
    mark = uuid.uuid4().hex
    return {**os.environ, MARK: mark, **extra}, mark


def marked_processes(mark: str, cmdline: str | None = None) -> dict[int, str]:
    """pid -> command line of every live process carrying `mark` (zombies excluded), or with `cmdline`: of
    every one whose command line contains it."""
    needle = f"{MARK}={mark}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if cmdline is not None and cmdline not in cmd:
                continue
            if cmdline is None and needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found[int(proc.name)] = cmd
        except OSError:
            continue
    return found


def wait_none_left(mark: str, cmdline: str | None = None, timeout_s: float = 30.0) -> dict[int, str]:
    """The processes `marked_processes(mark, cmdline)` finds still alive after up to `timeout_s` (empty: all gone)."""
    end = time.monotonic() + timeout_s
    while (left := marked_processes(mark, cmdline)) and time.monotonic() < end:
        time.sleep(0.5)
    return left
