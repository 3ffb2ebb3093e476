"""The colocated request path: validate -> place on a colocated worker (the policy over its load:
waiting + running, which there counts decodes too) -> Generate: that worker prefills and decodes in one
engine -> relay its stream. The baseline that the disaggregated flow is measured against, on the same
model and GPUs; the client sees the same messages (kv_handoff_ms = 0, prefill_worker = decode_worker).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import grpc
from pdserve.v1 import generate_pb2 as pb
from pdserve.v1 import worker_pb2 as wpb

from cluster.registry import WorkerInfo
from cluster.wire import sampling_to_proto
from router.errors import RouterError, worker_error
from router.orchestrator import Orchestrator, RequestRun
from router.validation import ValidRequest
from router.worker_sessions import RequestStream, WorkerSession
from router.worker_stream import ms_since, relay, what

ROLE = "colocated"


class ColocatedOrchestrator(Orchestrator):
    """Runs Generate requests on colocated workers; only the flow differs from `Orchestrator`."""

    async def _run(self, v: ValidRequest, run: RequestRun, t0: float,
                   time_remaining: Callable[[], float | None]) -> AsyncIterator[pb.GenerateResponse]:
        cfg, rid = self.config, v.request_id
        workers = [w for w in await self.reg(self.view.having(ROLE)) if w[0].role == ROLE]
        if not workers:
            raise RouterError(grpc.StatusCode.UNAVAILABLE,
                              f"no colocated workers are registered in cluster {cfg.cluster_name!r}")
        sampling = sampling_to_proto(v.sampling)
        t_call = time.perf_counter()

        async def generate(info: WorkerInfo, step: str) -> tuple[WorkerSession, RequestStream]:
            """Attach and queue the request: an unreachable worker shows here, before the client has seen
            anything, so the next one can still be tried."""
            session = await self.sessions.get(info)
            stream = session.open(rid)
            req = wpb.WorkerGenerateRequest(request_id=rid, token_ids=v.token_ids, sampling=sampling,
                                            router_id=session.router_id)
            try:
                await self.channels.stub(info.address).Generate(
                    req, timeout=self._timeout(cfg.prefill_timeout_s, time_remaining))
            except grpc.aio.AioRpcError as err:
                session.close(rid)
                raise worker_error(err, step) from None
            except BaseException:
                session.close(rid)
                raise
            return session, stream

        # The worker's inflight count stays taken for the whole stream (decodes are load here too), given
        # back with `_release` at its end: two registry round trips per request, as in the other flow.
        info, (session, stream) = await self._place(v, workers, run, "generate", generate, keep_inflight=True)
        try:
            step = what("generate", info)
            items = await stream.read(self._timeout(cfg.prefill_timeout_s, time_remaining), step)
            first, prefill_ms = items[0]
            final = pb.Final(
                usage=pb.Usage(prompt_tokens=len(v.token_ids), cached_prompt_tokens=first.num_cached_tokens),
                timing=pb.Timing(queue_ms=max(0.0, ms_since(t_call) - prefill_ms), prefill_ms=prefill_ms,
                                 kv_handoff_ms=0.0, ttft_ms=ms_since(t0), placement_ms=ms_since(t0, t_call)),
                prefill_worker=info.worker_id, decode_worker=info.worker_id)
            async for delta in relay(stream, items, final, step, cfg.decode_chunk_timeout_s, 1):
                yield pb.GenerateResponse(request_id=rid, delta=delta)
            run.finished = True
            final.timing.total_ms = ms_since(t0)
            yield pb.GenerateResponse(request_id=rid, final=final)
        finally:
            session.close(rid)
            await self._release(run)
