"""The colocated role: one engine prefills and decodes each request (the continuous batch mixes new prompts
with running decodes; no KV moves between workers). The baseline that disaggregation is measured against."""

from __future__ import annotations

from pdserve.v1 import worker_pb2 as wpb

from cluster.engine import LLMEngine
from cluster.wire import sampling_from_proto
from cluster.worker.service_base import WorkerError, WorkerServicerBase


class ColocatedServicer(WorkerServicerBase):
    async def Generate(self, request: wpb.WorkerGenerateRequest) -> wpb.WorkerGenerateReply:
        """Queue the request; its tokens, from the first one on, go to the router's stream (the first output's
        step is the prefill, its `num_cached_tokens` the prompt's cached part)."""
        rid = request.request_id
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            raise WorkerError("INVALID_ARGUMENT", str(e)) from None
        self.check_queue()
        tokens = list(request.token_ids)

        def add(engine: LLMEngine) -> None:
            engine.add_request(rid, tokens, params, num_output_tokens=request.num_output_tokens)

        await self.start_routed(rid, request.router_id, add)
        return wpb.WorkerGenerateReply()
