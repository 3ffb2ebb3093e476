"""What every role's servicer shares: RPC dispatch, stats, cancel, and the plumbing of every role.

A role's servicer lives in the engine process and answers the `WorkerService` RPCs that its gRPC front end
(`cluster.worker.frontend`, another process) passes on: one coroutine method per RPC, named like it, taking
the request message and returning the reply, or raising `WorkerError` with the status to answer. Tokens of a
running request do not go through RPC replies: they are routed to the router's stream (`EngineLoop.route`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from pdserve.v1 import worker_pb2 as wpb

from cluster.engine import LLMEngine, StepOutput
from cluster.engine.outputs import FINISH_ABORT
from cluster.kv_trace import KVTrace
from cluster.registry import AsyncRegistry
from cluster.worker.config import WorkerConfig
from cluster.worker.engine_loop import EngineLoop, output_queue

T = TypeVar("T")
_REQUESTS: dict[str, type[Message]] = {
    m.name: getattr(wpb, m.input_type.name) for m in wpb.DESCRIPTOR.services_by_name["WorkerService"].methods}


class WorkerError(Exception):
    """The status an RPC answers with: `code` is a grpc.StatusCode name, e.g. "RESOURCE_EXHAUSTED"."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


@dataclass
class Timed:
    """An engine output with the time its step started (perf_counter)."""

    output: StepOutput
    step_started: float


class WorkerServicerBase:
    """Shared parts; the role modules add Prefill, Reserve/Decode or Generate. RPCs a role does not define
    answer UNIMPLEMENTED. `transport` / `endpoint`: the role's end of its KV transport (a `KVSender` or a
    `KVReceiver`; None, "" if the role moves no KV)."""

    transport: Any = None
    endpoint: str = ""

    def __init__(self, config: WorkerConfig, worker_id: str, loop: EngineLoop) -> None:
        self.config = config
        self.worker_id = worker_id
        self.loop = loop
        # Blocking transport calls (a KV send, waiting for KV to land) get threads of their own: asyncio's default
        # pool has ~cores+4 threads, so under load waits would queue behind each other and add latency.
        self._blocking_pool = ThreadPoolExecutor(max_workers=max(32, config.max_queue),
                                                 thread_name_prefix=f"{config.role}-kv")

    @classmethod
    async def create(cls, config: WorkerConfig, worker_id: str, loop: EngineLoop,
                     registry: AsyncRegistry) -> WorkerServicerBase:
        """The role's servicer for a loaded engine (roles that move KV open their transport here); `registry`:
        the process's one registry, for roles that read it (the worker registers with it, and closes it)."""
        return cls(config, worker_id, loop)

    def open_transport(self, create: Callable[..., T]) -> T:
        """Open this worker's end of its KV transport over the engine's cache: `cluster.transport.create_sender`
        or `create_receiver` (the roles that move KV call this in `create`). The KV trace is read here, once."""
        cfg, engine = self.config, self.loop.engine
        self.transport = create(cfg.transport, engine.kv_layout, engine.kv_cache, host=cfg.host,
                                secret=cfg.cluster_secret, trace=KVTrace.from_env())
        return self.transport

    async def handle(self, method: str, request: bytes) -> bytes:
        """Answer one RPC: the request's bytes in, the reply's bytes out (or WorkerError)."""
        fn = getattr(self, method, None)
        if method not in _REQUESTS or fn is None:
            raise WorkerError("UNIMPLEMENTED", f"a {self.config.role} worker does not serve {method}")
        try:
            msg = _REQUESTS[method].FromString(request)
        except DecodeError as e:
            raise WorkerError("INVALID_ARGUMENT", f"{method}: undecodable request: {e}") from None
        reply = await fn(msg)
        return reply.SerializeToString()

    def close(self) -> None:
        """Stop the blocking-call threads (pending calls are cancelled) and the transport."""
        self._blocking_pool.shutdown(wait=False, cancel_futures=True)
        if self.transport is not None:
            self.transport.close()

    def submit_blocking(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a blocking call in the background, nobody waiting for it (e.g. aborting a KV stream)."""
        self._blocking_pool.submit(fn, *args)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (transport send / wait / forget) without holding up the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._blocking_pool, fn, *args)

    def load_counts(self) -> tuple[int, int, int, int]:
        """(waiting, running, free blocks, reserved blocks) for heartbeats."""
        s = self.loop.stats
        return s.num_waiting, s.num_running, s.num_free_blocks, s.num_reserved_blocks

    async def Cancel(self, request: wpb.CancelRequest) -> wpb.CancelReply:
        return wpb.CancelReply(found=await asyncio.wrap_future(self.loop.abort(request.request_id)))

    async def GetStats(self, request: wpb.StatsRequest) -> wpb.WorkerStats:
        s = self.loop.stats
        return wpb.WorkerStats(
            worker_id=self.worker_id, role=self.config.role, num_waiting=s.num_waiting,
            num_running=s.num_running, free_kv_blocks=s.num_free_blocks, total_kv_blocks=s.num_total_blocks,
            reserved_kv_blocks=s.num_reserved_blocks, num_prefix_cached_blocks=s.num_prefix_cached_blocks,
            block_size=self.config.engine.block_size)

    def check_queue(self) -> None:
        if self.loop.stats.num_waiting >= self.config.max_queue:
            raise WorkerError("RESOURCE_EXHAUSTED",
                              f"worker {self.worker_id} queue is full ({self.config.max_queue} waiting)")

    async def start_routed(self, request_id: str, router_id: str, add: Callable[[LLMEngine], None]) -> None:
        """Submit a request (`add(engine)`) whose outputs go to `router_id`'s stream. INVALID_ARGUMENT for a
        request the engine refuses, FAILED_PRECONDITION without a router."""
        if not router_id:
            raise WorkerError("FAILED_PRECONDITION", "router_id must name the caller's Attach stream")

        def submit(engine: LLMEngine) -> None:
            add(engine)
            self.loop.route(request_id, router_id)

        try:
            await self.loop.acall(submit)
        except ValueError as e:
            raise WorkerError("INVALID_ARGUMENT", str(e)) from None

    async def run_request(self, request_id: str, add: Callable[[LLMEngine], None]) -> AsyncIterator[Timed]:
        """Submit a request whose outputs this process consumes (`add(engine)`) and yield them until it
        finishes. Aborts the request in the engine if the caller stops early (cancel, error). Bad requests
        answer INVALID_ARGUMENT, a full queue RESOURCE_EXHAUSTED."""
        self.check_queue()
        q, callback = output_queue(asyncio.get_running_loop())

        def submit(engine: LLMEngine) -> None:
            add(engine)
            self.loop.watch(request_id, callback)

        finished = False
        try:
            try:
                await self.loop.acall(submit)
            except ValueError as e:
                raise WorkerError("INVALID_ARGUMENT", str(e)) from None
            while True:
                item, started = await q.get()
                if isinstance(item, BaseException):
                    raise WorkerError("INTERNAL", f"engine failed: {item}")
                finished = item.finished
                if item.finish_reason == FINISH_ABORT:
                    raise WorkerError("CANCELLED", f"request {request_id} was cancelled")
                yield Timed(item, started)
                if finished:
                    return
        finally:
            if not finished:
                self.loop.abort(request_id)
