"""The engine process's side of a worker's gRPC front end (`cluster.worker.frontend`, its own process).

`FrontendLink.start()` starts the front end with one end of a socket pair and waits until it serves. Then:
- a reader thread takes its messages: unary RPCs run as tasks on this process's event loop, on the role's
  servicer (`WorkerServicerBase.handle`); a cancelled RPC cancels its task; a router whose stream ended has
  its requests aborted;
- `send_step` is the engine loop's `on_step`: it queues the step batch and returns at once; a sender thread
  encodes and writes it, so the engine never waits for the front end or the network.
Messages are tuples of plain values encoded with `marshal` (the front end's module doc lists them). If the
front end dies, `on_lost` is called on the event loop (the worker aborts what it routed and starts another).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from cluster.secret import ENV as SECRET_ENV
from cluster.worker.engine_loop import EngineLoop, StepBatch
from cluster.worker.service_base import WorkerError, WorkerServicerBase

log = logging.getLogger(__name__)
_START_TIMEOUT_S = 60.0


class _Process:
    """One front end process and the socket to it, with its own outgoing queue and writer thread."""

    def __init__(self, host: str, secret: str) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.worker.frontend", "--fd", str(theirs.fileno()),
                                      "--host", host], pass_fds=(theirs.fileno(),),
                                     env={**os.environ, SECRET_ENV: secret})  # never in argv
        theirs.close()
        self.sock, self.conn = ours, Connection(os.dup(ours.fileno()))
        self.out: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.closing = False

    def wait_ready(self) -> int:
        """The front end's gRPC port, once it serves (RuntimeError if it exits or takes too long)."""
        end = time.monotonic() + _START_TIMEOUT_S
        while not self.conn.poll(0.1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker's gRPC front end exited with code {self.proc.returncode}")
            if time.monotonic() > end:
                raise RuntimeError(f"the worker's gRPC front end did not start in {_START_TIMEOUT_S:g}s")
        msg = marshal.loads(self.conn.recv_bytes())
        if msg[0] != "ready":
            raise RuntimeError(f"the worker's gRPC front end sent {msg[0]!r} before 'ready'")
        return int(msg[1])

    def write(self) -> None:
        """Writer thread: the queue's messages, in order, until None or the socket fails."""
        while (msg := self.out.get()) is not None:
            try:
                self.conn.send_bytes(marshal.dumps(msg))
            except OSError:
                return

    def close(self) -> None:
        """Close the socket (the front end exits when it sees that) and reap the process."""
        self.closing = True
        self.out.put(None)
        with contextlib.suppress(OSError):  # wakes the reader thread and tells the front end
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class FrontendLink:
    def __init__(self, servicer: WorkerServicerBase, loop: EngineLoop, host: str, secret: str = "",
                 on_lost: Callable[[], None] | None = None) -> None:
        self.servicer = servicer
        self._secret = secret
        self.engine_loop = loop
        self.host = host
        self.on_lost = on_lost
        self.port = 0
        self._current: _Process | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._aio: asyncio.AbstractEventLoop | None = None

    async def start(self) -> int:
        """Start a front end process (replacing a lost one; the cluster secret in its environment); returns its
        gRPC port once it serves."""
        self._aio = asyncio.get_running_loop()
        front = _Process(self.host, self._secret)
        try:
            self.port = await asyncio.to_thread(front.wait_ready)
        except BaseException:
            await asyncio.to_thread(front.close)
            raise
        self._current = front
        threading.Thread(target=self._read, args=(front,), name="frontend-reader", daemon=True).start()
        threading.Thread(target=front.write, name="frontend-writer", daemon=True).start()
        self.engine_loop.on_step = self.send_step
        return self.port

    def send_step(self, batch: StepBatch) -> None:
        self._send(("step", batch.step_ms, batch.outputs))

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._current is not None:
            self._current.out.put(msg)

    def _read(self, front: _Process) -> None:
        assert self._aio is not None
        try:
            while True:
                msg = marshal.loads(front.conn.recv_bytes())
                self._aio.call_soon_threadsafe(self._on_message, msg)
        except (EOFError, OSError):
            if not front.closing:
                log.error("the worker's gRPC front end (pid %s) is gone", front.proc.pid)
                self._aio.call_soon_threadsafe(self._lost, front)

    def _lost(self, front: _Process) -> None:
        if front is not self._current:
            return
        self._current = None
        self.engine_loop.on_step = None
        threading.Thread(target=front.close, daemon=True).start()
        for task in self._tasks.values():  # their callers' connections went with the front end
            task.cancel()
        if self.on_lost is not None:
            self.on_lost()

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "call":
            _, call_id, method, request = msg
            self._tasks[call_id] = asyncio.ensure_future(self._call(call_id, method, request))
        elif kind == "cancel":
            task = self._tasks.pop(msg[1], None)
            if task is not None:
                task.cancel()
        elif kind == "router_gone":
            self.engine_loop.abort_routed(msg[1])

    async def _call(self, call_id: int, method: str, request: bytes) -> None:
        try:
            reply = await self.servicer.handle(method, request)
        except WorkerError as e:
            self._send(("error", call_id, e.code, e.details))
        except asyncio.CancelledError:
            pass  # the caller is gone: nobody to answer
        except Exception as e:  # a bug: say so instead of leaving the call hanging
            log.exception("%s failed", method)
            self._send(("error", call_id, "INTERNAL", f"worker error: {type(e).__name__}: {e}"))
        else:
            self._send(("reply", call_id, reply))
        finally:
            self._tasks.pop(call_id, None)

    def stop(self) -> None:
        """Close the link and reap the front end process."""
        front, self._current = self._current, None
        if front is not None:
            front.close()
