"""Every way a terminal ends, turned into one stop for `pdserve up`: Ctrl-C (SIGINT), SIGTERM, SIGHUP (the
terminal closed) and a closed stdout pipe (`pdserve up | head -1` once `head` exits).

Each calls the one `on_stop` callback on the event loop, so shutdown runs once, in order. Writes to a closed
stdout are dropped (fd 1 then points at /dev/null) instead of raising `BrokenPipeError` in whatever was
printing, and count as a stop. `ray.init` sets its own SIGTERM handlers (a Python `sys.exit` and a C++ one
that aborts): the launcher calls `reclaim()` after it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from collections.abc import Callable
from typing import Any, TextIO

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_on_stop: Callable[[], None] | None = None  # set while `pdserve up` runs in this process


class _PipeGuard:
    """sys.stdout that, on a broken pipe, points fd 1 at /dev/null and asks to stop."""

    def __init__(self, stream: TextIO, on_broken: Callable[[], None]) -> None:
        self._stream = stream
        self._on_broken = on_broken
        self.broken = False

    def _closed(self) -> None:
        if not self.broken:
            self.broken = True
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
            self._on_broken()

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stdout_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def install(loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None]) -> None:
    """Route every stop signal, a broken stdout and the reader of our stdout pipe going away to `on_stop`
    (called on `loop`, possibly more than once)."""
    global _on_stop
    _on_stop = on_stop
    reclaim(loop)
    if not isinstance(sys.stdout, _PipeGuard):
        sys.stdout = _PipeGuard(sys.stdout, on_stop)  # type: ignore[assignment]
    if _stdout_is_pipe():
        fd = sys.stdout.fileno()

        def reader_gone() -> None:  # the write end of a pipe polls as an error once the read end closes
            loop.remove_reader(fd)  # level-triggered: it would fire on every loop turn
            on_stop()

        loop.add_reader(fd, reader_gone)


def reclaim(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Take the stop signals back after something else (ray.init) set its own handlers; a no-op unless
    `install` ran in this process (`pdserve up`, not a library user's program)."""
    if _on_stop is not None:
        loop = loop or asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, _on_stop)
