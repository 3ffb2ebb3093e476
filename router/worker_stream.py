"""Relaying one request's outputs (from its worker's Attach stream, `router.worker_sessions`) to the client as
deltas; shared by the disaggregated and the colocated flow, so both send the same messages.

Outputs that arrived while the client was still taking the previous delta go out as one delta: a client
that reads slower than the engine steps gets fewer, larger messages, and loses nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from pdserve.v1 import generate_pb2 as pb

from cluster.registry import WorkerInfo
from router.errors import RouterError
from router.worker_sessions import Output, RequestStream

FINISH_ABORT = "abort"
FINISH_ERROR = "error"


def what(step: str, info: WorkerInfo) -> str:
    """How errors name a step on a worker, e.g. "prefill on worker prefill-0 (10.0.0.1:5000)"."""
    return f"{step} on worker {info.worker_id} ({info.address})"


def ms_since(t0: float, t1: float | None = None) -> float:
    """Milliseconds from perf_counter time `t0` to `t1` (default: now)."""
    return ((t1 if t1 is not None else time.perf_counter()) - t0) * 1000.0


async def relay(stream: RequestStream, items: list[Output], final: pb.Final, step: str, chunk_timeout_s: float,
                first_step_index: int) -> AsyncIterator[pb.Delta]:
    """Relay a request's outputs from `items` (already read) to its finish reason as deltas; counts the tokens
    into `final.usage`, takes the finish reason, and the step time of output number `first_step_index` (the
    request's first decode step) as `final.timing.first_decode_step_ms`. `step` names the worker in errors."""
    index = 0
    while True:
        delta = pb.Delta()
        for out, step_ms in items:
            if index == first_step_index:
                final.timing.first_decode_step_ms = step_ms
            index += 1
            if out.finish_reason == FINISH_ABORT:
                raise RouterError(grpc.StatusCode.ABORTED, f"{step} was cancelled by the worker")
            if out.finish_reason == FINISH_ERROR:
                raise RouterError(grpc.StatusCode.INTERNAL, f"{step} failed: {out.error}")
            delta.token_ids.extend(out.token_ids)
            delta.text += out.text
            delta.logprobs.extend(out.logprobs)
            final.finish_reason = out.finish_reason
        final.usage.completion_tokens += len(delta.token_ids)
        if delta.token_ids or delta.text:
            yield delta
        if final.finish_reason:
            return
        items = await stream.read(chunk_timeout_s, step)
