"""Reading a worker's token stream (Decode, or colocated Generate) and relaying it to the client as deltas;
shared by the disaggregated and the colocated flow, so both send the same messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from pdserve.v1 import generate_pb2 as pb
from pdserve.v1 import worker_pb2 as wpb

from cluster.registry import WorkerInfo
from router.errors import RouterError, worker_error


def what(step: str, info: WorkerInfo) -> str:
    """How errors name a step on a worker, e.g. "prefill on worker prefill-0 (10.0.0.1:5000)"."""
    return f"{step} on worker {info.worker_id} ({info.address})"


def ms_since(t0: float, t1: float | None = None) -> float:
    """Milliseconds from perf_counter time `t0` to `t1` (default: now)."""
    return ((t1 if t1 is not None else time.perf_counter()) - t0) * 1000.0


async def next_chunk(call: Any, limit: float, step: str) -> wpb.DecodeChunk:
    """The next chunk of a worker's token stream; RouterError if none comes within `limit` seconds, the worker
    fails, or the stream ends before a finish reason. `step` names it in errors (see `what`)."""
    try:
        chunk = await asyncio.wait_for(call.read(), limit)
    except TimeoutError:
        raise RouterError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{step}: no tokens for {limit:g}s") from None
    except grpc.aio.AioRpcError as err:
        raise worker_error(err, step) from None
    if chunk is grpc.aio.EOF:
        raise RouterError(grpc.StatusCode.ABORTED, f"{step}: stream ended without a finish reason")
    return chunk


async def relay(call: Any, step: str, chunk: wpb.DecodeChunk, final: pb.Final,
                chunk_timeout_s: float) -> AsyncIterator[pb.Delta]:
    """Relay a token stream from `chunk` (already read) to its finish reason as deltas; counts the tokens into
    `final.usage` and takes the finish reason and the first decode step's time (from the chunk that has it)."""
    while True:
        final.usage.completion_tokens += len(chunk.token_ids)
        final.finish_reason = chunk.finish_reason
        if chunk.first_step_ms:
            final.timing.first_decode_step_ms = chunk.first_step_ms
        if chunk.token_ids or chunk.text:
            yield pb.Delta(token_ids=chunk.token_ids, text=chunk.text, logprobs=chunk.logprobs)
        if final.finish_reason:
            return
        chunk = await next_chunk(call, chunk_timeout_s, step)
