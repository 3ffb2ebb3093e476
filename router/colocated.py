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
from router.migration import Progress, stream_failure
from router.orchestrator import Orchestrator
from router.placement import RequestRun
from router.validation import ValidRequest
from router.worker_sessions import RequestStream, WorkerSession
from router.worker_stream import ms_since, relay, what

ROLE = "colocated"


class ColocatedOrchestrator(Orchestrator):
    """Runs Generate requests on colocated workers; only an attempt's flow differs from `Orchestrator`. A
    worker lost mid-stream is migrated from as there: the next attempt's worker prefills the prompt and the
    tokens sent in its own engine and streams on."""

    async def _attempt(self, v: ValidRequest, run: RequestRun, progress: Progress, final: pb.Final, t0: float,
                       time_remaining: Callable[[], float | None]) -> AsyncIterator[pb.Delta]:
        cfg = self.config
        workers = [w for w in await self.reg(self.view.having(ROLE))
                   if w[0].role == ROLE and w[0].worker_id not in progress.lost]
        if not workers:
            raise RouterError(grpc.StatusCode.UNAVAILABLE,
                              f"no colocated workers are registered in cluster {cfg.cluster_name!r}")
        sampling = sampling_to_proto(v.sampling)
        rid, n_out = run.worker_request_id, len(progress.sent)
        t_call = time.perf_counter()

        async def generate(info: WorkerInfo, step: str) -> tuple[WorkerSession, RequestStream]:
            """Attach and queue the request: an unreachable worker shows here, before the client has seen
            anything of this attempt, so the next one can still be tried."""
            session = await self.sessions.get(info)
            stream = session.open(rid)
            req = wpb.WorkerGenerateRequest(request_id=rid, token_ids=v.token_ids + progress.sent, sampling=sampling,
                                            router_id=session.router_id, num_output_tokens=n_out)
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
        info, (session, stream) = await self._place(v, workers, run, "generate", generate, keep_inflight=True,
                                                    avoid=progress.avoid)
        try:
            step = what("generate", info)
            items = await stream.read(self._timeout(cfg.prefill_timeout_s, time_remaining), step)
            first, prefill_ms = items[0]
            if not n_out:  # the request's first token: the client's TTFT, and the prompt's cache figures
                final.usage.cached_prompt_tokens = first.num_cached_tokens
                final.timing.queue_ms = max(0.0, ms_since(t_call) - prefill_ms)
                final.timing.prefill_ms, final.timing.kv_handoff_ms = prefill_ms, 0.0
                final.timing.ttft_ms, final.timing.placement_ms = ms_since(t0), ms_since(t0, t_call)
            final.prefill_worker = final.decode_worker = info.worker_id
            async for delta in relay(stream, items, final, step, cfg.decode_chunk_timeout_s, 1 if not n_out else -1):
                yield delta
        except RouterError as err:
            raise stream_failure(err, info.worker_id) from None
        finally:
            session.close(rid)
            await self._release(run)
