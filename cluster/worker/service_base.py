"""What every worker's `WorkerService` answers the same way: stats, cancel, and the plumbing of every role."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from pdserve.v1 import worker_pb2 as wpb
from pdserve.v1 import worker_pb2_grpc as wpb_grpc

from cluster.engine import LLMEngine, StepOutput
from cluster.engine.outputs import FINISH_ABORT
from cluster.wire import logprobs_to_proto
from cluster.worker.config import WorkerConfig
from cluster.worker.engine_loop import EngineLoop, output_queue

T = TypeVar("T")


@dataclass
class Timed:
    """An engine output with the time its step started (perf_counter)."""

    output: StepOutput
    step_started: float


def chunk_from_output(out: StepOutput) -> wpb.DecodeChunk:
    """One engine output as a stream chunk: its new tokens, text, logprobs and (last one) finish reason."""
    chunk = wpb.DecodeChunk(token_ids=out.new_token_ids, text=out.text_delta, finish_reason=out.finish_reason or "")
    if out.logprobs:
        chunk.logprobs.extend(logprobs_to_proto(t, lp) for t, lp in zip(out.new_token_ids, out.logprobs, strict=True))
    return chunk


class WorkerServicerBase(wpb_grpc.WorkerServiceServicer):
    """Shared parts; the role modules add Prefill, Reserve/Decode or Generate. Unimplemented RPCs answer
    UNIMPLEMENTED."""

    def __init__(self, config: WorkerConfig, worker_id: str, loop: EngineLoop) -> None:
        self.config = config
        self.worker_id = worker_id
        self.loop = loop
        # Blocking transport calls (a KV send, waiting for KV to land) get threads of their own: asyncio's default
        # pool has ~cores+4 threads, so under load waits would queue behind each other and add latency.
        self._blocking_pool = ThreadPoolExecutor(max_workers=max(32, config.max_queue),
                                                 thread_name_prefix=f"{config.role}-kv")

    def close(self) -> None:
        """Stop the blocking-call threads (pending calls are cancelled)."""
        self._blocking_pool.shutdown(wait=False, cancel_futures=True)

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

    async def Cancel(self, request: wpb.CancelRequest, context: grpc.aio.ServicerContext) -> wpb.CancelReply:
        found = await asyncio.wrap_future(self.loop.abort(request.request_id))
        return wpb.CancelReply(found=found)

    async def GetStats(self, request: wpb.StatsRequest, context: grpc.aio.ServicerContext) -> wpb.WorkerStats:
        s = self.loop.stats
        return wpb.WorkerStats(
            worker_id=self.worker_id, role=self.config.role, num_waiting=s.num_waiting,
            num_running=s.num_running, free_kv_blocks=s.num_free_blocks, total_kv_blocks=s.num_total_blocks,
            reserved_kv_blocks=s.num_reserved_blocks, num_prefix_cached_blocks=s.num_prefix_cached_blocks,
            block_size=self.config.engine.block_size)

    async def run_request(self, request_id: str, add: Callable[[LLMEngine], None], context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[Timed]:
        """Submit a request to the engine (`add(engine)`) and yield its outputs until it finishes.

        Aborts the request in the engine if the caller stops early (client cancel, deadline, error).
        Bad requests answer INVALID_ARGUMENT, a full queue RESOURCE_EXHAUSTED.
        """
        if self.loop.stats.num_waiting >= self.config.max_queue:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"worker {self.worker_id} queue is full ({self.config.max_queue} waiting)")
        q, callback = output_queue(asyncio.get_running_loop())

        def submit(engine):
            add(engine)
            self.loop.watch(request_id, callback)

        finished = False
        try:
            try:
                await self.loop.acall(submit)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            while True:
                item, started = await q.get()
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {item}")
                finished = item.finished
                if item.finish_reason == FINISH_ABORT:
                    await context.abort(grpc.StatusCode.CANCELLED, f"request {request_id} was cancelled")
                yield Timed(item, started)
                if finished:
                    return
        finally:
            if not finished:
                self.loop.abort(request_id)

