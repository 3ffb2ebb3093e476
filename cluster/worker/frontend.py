"""A worker's gRPC front end: its own process (torch-free), so serving RPCs and streaming tokens never shares a
GIL with the engine step.

It serves `WorkerService` for the engine process that started it (`cluster.worker.frontend_link`), over one
socket to it:
- unary RPCs (Reserve, Prefill, Decode, Generate, Cancel, GetStats) pass through as bytes; the engine
  process's role servicer answers them, or names the status to abort with;
- `Attach` is served here: one stream per router; each engine step arrives as one message holding the
  step's outputs for every router, and each router's part is packed into that router's next `OutputBatch`
  (several steps in one message while the router reads slower than the engine steps; nothing is dropped:
  a request's outputs are bounded by its max_tokens). When a router's stream ends, the engine aborts the
  requests it carried.

Every call must carry the cluster's worker token (`cluster.secret`; the secret comes in the environment,
never in argv), else it is refused at once with UNAUTHENTICATED.

    PDSERVE_CLUSTER_SECRET=... python -m cluster.worker.frontend --fd N --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import logging
import marshal
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import grpc
from pdserve.v1 import generate_pb2 as pb
from pdserve.v1 import worker_pb2 as wpb

from cluster.grpc_auth import TokenGuard
from cluster.secret import pop_env_secret, worker_token

log = logging.getLogger(__name__)
SERVICE = "pdserve.v1.WorkerService"
UNARY_METHODS = ("Reserve", "Prefill", "Decode", "Generate", "Cancel", "GetStats")
MAX_MESSAGE = 64 << 20


def _output(entry: list[Any] | tuple[Any, ...]) -> wpb.RequestOutput:
    """A routed output (`cluster.worker.engine_loop.RoutedOutput`) as a message."""
    rid, tokens, text, lps, finish, cached, error = entry
    out = wpb.RequestOutput(request_id=rid, token_ids=tokens, text=text, finish_reason=finish,
                            num_cached_tokens=cached, error=error)
    if lps:
        out.logprobs.extend(pb.TokenLogprobs(token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=a, logprob=b)
                                                                          for a, b in top]) for t, lp, top in lps)
    return out


class RouterStream:
    """One router's Attach stream: engine steps queue here until the writer sends them."""

    def __init__(self) -> None:
        self.pending: list[wpb.EngineStep] = []
        self.ready = asyncio.Event()

    def push(self, step_ms: float, entries: list[Any]) -> None:
        self.pending.append(wpb.EngineStep(step_ms=step_ms, outputs=[_output(e) for e in entries]))
        self.ready.set()

    async def batches(self) -> AsyncIterator[bytes]:
        yield b""  # the empty first message: attached
        while True:
            await self.ready.wait()
            self.ready.clear()
            steps, self.pending = self.pending, []
            yield wpb.OutputBatch(steps=steps).SerializeToString()


class FrontEnd:
    """The gRPC server and the engine link of one worker."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.loop = loop
        self._send_lock = threading.Lock()
        self._calls: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count()
        self.routers: dict[str, RouterStream] = {}
        self.engine_gone = asyncio.Event()

    def send(self, *msg: Any) -> None:
        with self._send_lock:
            self.conn.send_bytes(marshal.dumps(msg))

    # ---- from the engine process (reader thread -> event loop) -----------------------------------------
    def read_engine(self) -> None:
        """Reader thread: each message from the engine process, handled on the event loop."""
        try:
            while True:
                msg = marshal.loads(self.conn.recv_bytes())
                self.loop.call_soon_threadsafe(self._on_message, msg)
        except (EOFError, OSError):
            self.loop.call_soon_threadsafe(self.engine_gone.set)

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "step":
            _, step_ms, by_router = msg
            for router_id, entries in by_router.items():
                stream = self.routers.get(router_id)
                if stream is not None:
                    stream.push(step_ms, entries)
                else:  # the router left between the engine's step and now: its requests must not run on
                    self.send("router_gone", router_id)
            return
        fut = self._calls.pop(msg[1], None)
        if fut is None or fut.done():
            return
        if kind == "reply":
            fut.set_result(msg[2])
        else:  # ("error", id, code name, message)
            fut.set_exception(_Abort(grpc.StatusCode[msg[2]], msg[3]))

    # ---- RPCs ----------------------------------------------------------------------------------------
    def unary(self, method: str) -> Any:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            call_id = next(self._ids)
            fut: asyncio.Future[bytes] = self.loop.create_future()
            self._calls[call_id] = fut
            self.send("call", call_id, method, request)
            try:
                return await fut
            except _Abort as e:
                await context.abort(e.code, e.details)
            except asyncio.CancelledError:  # the caller cancelled or its deadline passed
                self._calls.pop(call_id, None)
                self.send("cancel", call_id)
                raise

        return grpc.unary_unary_rpc_method_handler(handle)

    async def attach(self, request: wpb.AttachRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        router_id = request.router_id
        if not router_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "router_id must be given")
        if router_id in self.routers:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"router {router_id!r} is already attached")
        stream = self.routers[router_id] = RouterStream()
        try:
            async for batch in stream.batches():
                yield batch
        finally:
            del self.routers[router_id]
            self.send("router_gone", router_id)

    def handlers(self) -> grpc.GenericRpcHandler:
        methods = {m: self.unary(m) for m in UNARY_METHODS}
        methods["Attach"] = grpc.unary_stream_rpc_method_handler(self.attach,
                                                                 request_deserializer=wpb.AttachRequest.FromString)
        return grpc.method_handlers_generic_handler(SERVICE, methods)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _die_with_parent() -> None:
    """SIGTERM this process when the engine process dies (Linux), so no front end outlives its worker."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def serve(conn: Connection, host: str, secret: str) -> None:
    loop = asyncio.get_running_loop()
    front = FrontEnd(conn, loop)
    guard = [TokenGuard(worker_token(secret))] if secret else []
    # gRPC core sheds calls the event loop has not taken up yet past max_pending_requests (as bare CANCELLED);
    # every call must reach the servicer, which answers overload itself (RESOURCE_EXHAUSTED).
    server = grpc.aio.server(interceptors=guard, options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                                          ("grpc.max_send_message_length", MAX_MESSAGE),
                                                          ("grpc.server.max_pending_requests", 1 << 16),
                                                          ("grpc.server.max_pending_requests_hard_limit", 1 << 16)])
    server.add_generic_rpc_handlers((front.handlers(),))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    threading.Thread(target=front.read_engine, name="engine-link", daemon=True).start()
    front.send("ready", port)
    await front.engine_gone.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.worker.frontend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fd", type=int, required=True, help="the socket to the engine process")
    parser.add_argument("--host", required=True, help="address to bind")
    args = parser.parse_args(argv)
    _die_with_parent()
    secret = pop_env_secret()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conn = Connection(socket.socket(fileno=args.fd).detach())
    asyncio.run(serve(conn, args.host, secret))
    os._exit(0)  # grpc's threads must not hold the exit


if __name__ == "__main__":
    raise SystemExit(main())
