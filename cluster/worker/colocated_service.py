"""The colocated role: one engine prefills and decodes each request (the continuous batch mixes new prompts
with running decodes; no KV moves between workers). The baseline that disaggregation is measured against."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from pdserve.v1 import worker_pb2 as wpb

from cluster.engine import LLMEngine
from cluster.wire import sampling_from_proto
from cluster.worker.service_base import WorkerServicerBase, chunk_from_output


class ColocatedServicer(WorkerServicerBase):
    async def Generate(self, request: wpb.WorkerGenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[wpb.DecodeChunk]:
        """Stream the request's tokens from the first one on. The first chunk carries the prefill timing
        (queue: submit -> the step that sampled the first token; prefill: that step), the second the
        request's first decode step as `first_step_ms`, like a decode worker's first chunk."""
        rid = request.request_id
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        tokens = list(request.token_ids)

        def add(engine: LLMEngine) -> None:
            engine.add_request(rid, tokens, params)

        t_submit = time.perf_counter()
        n = 0
        async for timed in self.run_request(rid, add, context):
            out, step_ms = timed.output, (time.perf_counter() - timed.step_started) * 1e3
            chunk = chunk_from_output(out)
            if n == 0:
                chunk.prefill.CopyFrom(wpb.PrefillTiming(queue_ms=(timed.step_started - t_submit) * 1e3,
                                                         prefill_ms=step_ms, num_cached_tokens=out.num_cached_tokens))
            elif n == 1:
                chunk.first_step_ms = step_ms
            n += 1
            yield chunk
