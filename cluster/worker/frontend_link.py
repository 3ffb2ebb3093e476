"""The engine process's side of a worker's gRPC front end (`cluster.worker.frontend`, its own process).

`FrontendLink.start()` starts the front end with one end of a socket pair and waits until it serves. Then:
- a reader thread takes its messages: unary RPCs run as tasks on this process's event loop, on the role's
  servicer (`WorkerServicerBase.handle`); a cancelled RPC cancels its task; a router whose stream ended has
  its requests aborted;
- `send_step` is the engine loop's `on_step`: it queues the step batch and returns at once; a sender thread
  encodes and writes it, so the engine never waits for the front end or the network.
Messages are tuples of plain values encoded with `marshal` (the front end's module doc lists them).
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
from multiprocessing.connection import Connection
from typing import Any

from cluster.secret import ENV as SECRET_ENV
from cluster.worker.engine_loop import EngineLoop, StepBatch
from cluster.worker.service_base import WorkerError, WorkerServicerBase

log = logging.getLogger(__name__)
_START_TIMEOUT_S = 60.0


class FrontendLink:
    def __init__(self, servicer: WorkerServicerBase, loop: EngineLoop, host: str, secret: str = "") -> None:
        self.servicer = servicer
        self._secret = secret
        self.engine_loop = loop
        self.host = host
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._out: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._aio: asyncio.AbstractEventLoop | None = None

    async def start(self) -> int:
        """Start the front end process (the cluster secret in its environment); returns its gRPC port once it
        serves."""
        self._aio = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "cluster.worker.frontend", "--fd", str(theirs.fileno()),
                                       "--host", self.host], pass_fds=(theirs.fileno(),),
                                      env={**os.environ, SECRET_ENV: self._secret})  # never in argv
        theirs.close()
        self._sock, self._conn = ours, Connection(os.dup(ours.fileno()))
        ready = await asyncio.to_thread(self._wait_ready)
        self.port = int(ready[1])
        threading.Thread(target=self._read, name="frontend-reader", daemon=True).start()
        threading.Thread(target=self._write, name="frontend-writer", daemon=True).start()
        self.engine_loop.on_step = self.send_step
        return self.port

    def _wait_ready(self) -> tuple[Any, ...]:
        assert self._conn is not None and self._proc is not None
        end = time.monotonic() + _START_TIMEOUT_S
        while not self._conn.poll(0.1):
            if self._proc.poll() is not None:
                raise RuntimeError(f"the worker's gRPC front end exited with code {self._proc.returncode}")
            if time.monotonic() > end:
                raise RuntimeError(f"the worker's gRPC front end did not start in {_START_TIMEOUT_S:g}s")
        msg = marshal.loads(self._conn.recv_bytes())
        if msg[0] != "ready":
            raise RuntimeError(f"the worker's gRPC front end sent {msg[0]!r} before 'ready'")
        return msg

    def send_step(self, batch: StepBatch) -> None:
        self._out.put(("step", batch.step_ms, batch.outputs))

    def _write(self) -> None:
        assert self._conn is not None
        while (msg := self._out.get()) is not None:
            try:
                self._conn.send_bytes(marshal.dumps(msg))
            except OSError:  # the front end is gone; stop() follows
                return

    def _read(self) -> None:
        assert self._conn is not None and self._aio is not None
        try:
            while True:
                msg = marshal.loads(self._conn.recv_bytes())
                self._aio.call_soon_threadsafe(self._on_message, msg)
        except (EOFError, OSError):
            log.info("the worker's gRPC front end closed its link")

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
            self.engine_loop.abort_router(msg[1])

    async def _call(self, call_id: int, method: str, request: bytes) -> None:
        try:
            reply = await self.servicer.handle(method, request)
        except WorkerError as e:
            self._out.put(("error", call_id, e.code, e.details))
        except asyncio.CancelledError:
            pass  # the caller is gone: nobody to answer
        except Exception as e:  # a bug: say so instead of leaving the call hanging
            log.exception("%s failed", method)
            self._out.put(("error", call_id, "INTERNAL", f"worker error: {type(e).__name__}: {e}"))
        else:
            self._out.put(("reply", call_id, reply))
        finally:
            self._tasks.pop(call_id, None)

    def stop(self) -> None:
        """Close the link (the front end exits when it sees that) and reap the process."""
        self._out.put(None)
        if self._sock is not None:  # wakes the reader thread and tells the front end
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
