"""The request path: validate -> admit -> wait for a prefill slot -> reserve KV on a decode worker -> prefill
(pushes KV) -> stream decode. Admission (`router.admission`) runs a request only while its blocks fit the
pools; the prefill stage (the same gate, `prefill_slots_per_worker` per prefill worker) holds a request
before its reservation, so a decode worker's blocks are not held by prompts still queueing for prefill.

The registry costs a request two round trips: `place` (decode worker + its blocks, prompt workers in the
policy's order + inflight) at the start, `release` (all of it) once the prompt worker is done; the worker
listing comes from the cached `WorkerView`. Every exit path frees what it took: registry counters in
`finally` next to where they were taken (`RequestRun.held` until then), and on any failure or client
cancel, the in-flight worker RPCs are cancelled and both workers get a Cancel.

A request runs as one attempt, or more when its decode worker is lost mid-stream or its KV handoff fails
(`router.migration`): each later attempt prefills the prompt plus the tokens already sent, under an id of
its own on the workers (`RequestRun.worker_request_id`), so nothing a failed attempt left behind can meet it.
`Orchestrator` runs the disaggregated flow on `router.placement.WorkerPlacement` (placement, reservation and
registry bookkeeping); `router.colocated.ColocatedOrchestrator` replaces only an attempt's flow (`_attempt`)
and shares the rest: admission, attempts, placement (`_place`), registry bookkeeping and cleanup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable

import grpc
from pdserve.v1 import generate_pb2 as pb
from pdserve.v1 import worker_pb2 as wpb

from cluster.registry import AsyncRegistry, WorkerInfo
from cluster.wire import sampling_to_proto
from router.admission import Admission
from router.channels import WorkerChannels
from router.config import RouterConfig
from router.errors import RouterError, worker_error
from router.migration import AttemptFailed, Progress, handoff_failure, stream_failure
from router.model_info import ModelInfo
from router.placement import RequestRun, WorkerPlacement
from router.policy import PrefillPolicy
from router.validation import ValidRequest, validate
from router.worker_sessions import WorkerSessions
from router.worker_stream import ms_since, relay, what

log = logging.getLogger(__name__)
Code = grpc.StatusCode
_REUSE_GRACE_S = 0.5  # beyond the Cancel timeout, how long a reused request id waits for its old request


def _earliest(end: float, time_remaining: Callable[[], float | None]) -> Callable[[], float]:
    """A time_remaining that also stops at `end` (a perf_counter time)."""
    def left() -> float:
        call_left = time_remaining()
        own = end - time.perf_counter()
        return own if call_left is None else min(own, call_left)
    return left


class Orchestrator(WorkerPlacement):
    """Runs Generate requests across the prefill and decode pools."""

    def __init__(self, config: RouterConfig, model: ModelInfo, registry: AsyncRegistry,
                 channels: WorkerChannels, policy: PrefillPolicy) -> None:
        super().__init__(config, registry, channels, policy)
        self.model = model
        self.sessions = WorkerSessions(channels)  # the workers' output streams to this router
        self._inflight: dict[str, asyncio.Future[None]] = {}  # ids in use -> done once freed on every worker
        self.admission = Admission(self._capacity, config.max_queue, config.queue_timeout_s,
                                   max_admitted=self._request_capacity)
        # Requests between their decode reservation and the end of their prefill: a few per prefill worker,
        # so decode blocks are reserved when the prefill is about to run, not while the prompt queues.
        self.prefill_stage = Admission(self._prefill_slots, config.max_queue, config.queue_timeout_s,
                                       unit="prefill slots")

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    async def generate(self, req: pb.GenerateRequest,
                       time_remaining: Callable[[], float | None]) -> AsyncIterator[pb.GenerateResponse]:
        """Yield the client's responses; raises RouterError with the status to return."""
        t0 = time.perf_counter()
        self.admission.check_room()  # before any work: an overloaded router must refuse cheaply
        if len(req.text) > 4096:  # keep long tokenizations off the event loop
            v = await asyncio.to_thread(validate, req, self.model)
        else:
            v = validate(req, self.model)
        await self._claim(v.request_id)
        run = RequestRun(v.request_id)
        try:
            async with self.admission.admit(self._cost(v), time_remaining):
                async for msg in self._run(v, run, t0, time_remaining):
                    yield msg
        finally:
            if run.freeing:
                pass  # the cleanup under way frees the id
            elif run.finished and all(cancels.done() for cancels in run.abandoned):
                self._free_id(v.request_id)
            else:  # in the background: the client's status must not wait for a dead worker
                self._spawn(self._cleanup(run))

    async def _claim(self, request_id: str) -> None:
        """Take the request id. An id still in use (its request ending, or its workers being told to free
        it) is waited for, up to a Cancel's timeout and a little more: an id is reusable as soon as the client
        has cancelled it. ALREADY_EXISTS if it is still in use then."""
        end = time.perf_counter() + self.config.cancel_timeout_s + _REUSE_GRACE_S
        while (held := self._inflight.get(request_id)) is not None:
            try:
                await asyncio.wait_for(asyncio.shield(held), max(0.0, end - time.perf_counter()))
            except TimeoutError:
                raise RouterError(Code.ALREADY_EXISTS, f"request_id {request_id!r} is already in flight") from None
        self._inflight[request_id] = asyncio.get_running_loop().create_future()

    def _free_id(self, request_id: str) -> None:
        held = self._inflight.pop(request_id, None)
        if held is not None and not held.done():
            held.set_result(None)

    def _capacity(self) -> int:
        """KV blocks in the pools that hold running requests (decode or colocated workers), per the view."""
        role = self.config.serving_roles[-1]
        return sum(w.total_kv_blocks for w, _ in self.view.workers if w.role == role)

    def _request_capacity(self) -> int:
        """Requests the serving pools hold at once (running + queued on the workers), per the view; a worker
        that states no bound leaves only the KV blocks to bound them."""
        role = self.config.serving_roles[-1]
        bounds = [w.max_requests for w, _ in self.view.workers if w.role == role]
        return sum(bounds) if bounds and all(bounds) else sys.maxsize

    def _prefill_slots(self) -> int:
        n = sum(w.role == "prefill" for w, _ in self.view.workers)
        return n * self.config.prefill_slots_per_worker

    def _cost(self, v: ValidRequest) -> int:
        """The KV blocks a request needs to run to its end (prompt + max_tokens)."""
        sizes = [w.block_size for w, _ in self.view.workers]
        block_size = sizes[0] if sizes else 16
        return -(-(len(v.token_ids) + v.sampling.max_tokens) // block_size)

    async def _run(self, v: ValidRequest, run: RequestRun, t0: float,
                   time_remaining: Callable[[], float | None]) -> AsyncIterator[pb.GenerateResponse]:
        """The flow of one validated request: yields the client's responses, sets `run.finished` at the end. An
        attempt that fails in a way `router.migration` says another may mend is followed by one that goes on
        from what the client has."""
        rid = v.request_id
        final = pb.Final(usage=pb.Usage(prompt_tokens=len(v.token_ids)))
        progress = Progress()
        while True:
            try:
                async for delta in self._attempt(v, run, progress, final, t0, time_remaining):
                    progress.sent.extend(delta.token_ids)
                    yield pb.GenerateResponse(request_id=rid, delta=delta)
                break
            except AttemptFailed as failure:
                await self._next_attempt(run, progress, failure, time_remaining)
        run.finished = True
        final.num_migrations = run.attempt
        final.timing.total_ms = ms_since(t0)
        yield pb.GenerateResponse(request_id=rid, final=final)

    async def _next_attempt(self, run: RequestRun, progress: Progress, failure: AttemptFailed,
                            time_remaining: Callable[[], float | None]) -> None:
        """Leave the failed attempt (its workers told to free it, in the background) for a new one, or raise the
        failure's status when no other attempt may follow."""
        role = self.config.serving_roles[-1]
        live = [w.worker_id for w, _ in self.view.workers if w.role == role]
        if not progress.may_continue(failure, self.config, live, time_remaining()):
            raise failure.error
        await self._release(run)  # normally released already, where it was taken
        left_id, left_on = run.next_attempt()
        log.warning("request %s: %s; continuing after %d tokens as %s (%s)", run.request_id, failure.error.reason,
                    len(progress.sent), run.worker_request_id, failure.cause)
        run.abandoned.append(self._spawn(self._cancel_on(left_id, left_on)))

    async def _attempt(self, v: ValidRequest, run: RequestRun, progress: Progress, final: pb.Final, t0: float,
                       time_remaining: Callable[[], float | None]) -> AsyncIterator[pb.Delta]:
        """One attempt: reserve, prefill (the prompt and `progress.sent`), decode; yields the new deltas and fills
        `final`. Raises AttemptFailed for a failure another attempt may mend."""
        cfg = self.config
        workers = await self.reg(self.view.having("prefill", "decode"))
        prefills = [w for w in workers if w[0].role == "prefill"]
        decodes = [w for w in workers if w[0].role == "decode" and w[0].worker_id not in progress.lost]
        if not prefills or not decodes:
            missing = " and ".join(r for r, ws in (("prefill", prefills), ("decode", decodes)) if not ws)
            raise RouterError(Code.UNAVAILABLE, f"no {missing} workers are registered in cluster "
                                                f"{cfg.cluster_name!r}")
        sampling = sampling_to_proto(v.sampling)
        a = dataclasses.replace(v, request_id=run.worker_request_id, token_ids=v.token_ids + progress.sent)
        n_out = len(progress.sent)  # output tokens the workers get as part of the prompt
        async with self.prefill_stage.admit(1, time_remaining):  # no decode blocks held while it waits here
            dinfo, reserved = await self._reserve_when_room(a, decodes, run, time_remaining, exclude=progress.lost)
            lease_end = time.perf_counter() + cfg.reserve_lease_ms / 1000.0
            dest = wpb.KVDestination(worker_id=dinfo.worker_id, transport=reserved.transport or dinfo.transport,
                                     transport_endpoint=reserved.transport_endpoint or dinfo.transport_endpoint,
                                     block_ids=reserved.block_ids)
            t_prefill = time.perf_counter()
            try:
                pinfo, prefilled = await self._prefill(
                    a, prefills, wpb.PrefillRequest(request_id=a.request_id, token_ids=a.token_ids, sampling=sampling,
                                                    dest=dest, num_output_tokens=n_out),
                    run, _earliest(lease_end, time_remaining), avoid=progress.avoid)
            except RouterError as err:
                raise handoff_failure(err, [w for w, i in run.workers.items() if i.role == "prefill"]) from None
        first = pb.Delta(token_ids=[prefilled.first_token_id], text=prefilled.text)
        if prefilled.HasField("first_logprobs"):
            first.logprobs.append(prefilled.first_logprobs)
        pt = prefilled.timing
        if not n_out:  # the request's first token: the client's TTFT, and the prompt's cache figures
            timing = final.timing
            timing.queue_ms, timing.placement_ms = ms_since(t0, t_prefill) + pt.queue_ms, ms_since(t0, t_prefill)
            timing.prefill_ms, timing.kv_handoff_ms, timing.ttft_ms = pt.prefill_ms, pt.kv_handoff_ms, ms_since(t0)
            final.usage.cached_prompt_tokens = pt.num_cached_tokens
        final.timing.kv_handoff_bytes += pt.kv_bytes
        final.usage.completion_tokens += 1
        final.prefill_worker, final.decode_worker = pinfo.worker_id, dinfo.worker_id
        yield first
        if prefilled.finish_reason:  # the first token ended it: no KV was pushed, free the reservation
            final.finish_reason = prefilled.finish_reason
            final.decode_worker = ""
            run.freeing = True  # the id stays taken until the decode worker has freed it
            self._spawn(self._cleanup(run))
            return
        async for delta in self._decode(a, n_out, dinfo, sampling, prefilled.first_token_id, run, final,
                                        time_remaining):
            yield delta

    async def _decode(self, a: ValidRequest, n_out: int, dinfo: WorkerInfo, sampling: pb.SamplingParams,
                      first_token: int, run: RequestRun, final: pb.Final,
                      time_remaining: Callable[[], float | None]) -> AsyncIterator[pb.Delta]:
        """Start the attempt `a`'s decode (the last `n_out` of its tokens already sent output) and relay its
        outputs as deltas; fills `final`'s finish reason, usage and timing."""
        step = what("decode", dinfo)
        try:
            session = await self.sessions.get(dinfo)
        except RouterError as err:
            raise stream_failure(err, dinfo.worker_id) from None
        stream = session.open(a.request_id)
        try:
            try:
                await self.channels.stub(dinfo.address).Decode(
                    wpb.DecodeRequest(request_id=a.request_id, token_ids=a.token_ids, first_token_id=first_token,
                                      sampling=sampling, router_id=session.router_id, num_output_tokens=n_out),
                    timeout=time_remaining())
            except grpc.aio.AioRpcError as err:
                error = worker_error(err, step)
                prefills = [w for w, i in run.workers.items() if i.role == "prefill"]
                raise (stream_failure(error, dinfo.worker_id) if error.code == Code.UNAVAILABLE
                       else handoff_failure(error, prefills)) from None
            items = await stream.read(self.config.decode_first_token_timeout_s, step)
            async for delta in relay(stream, items, final, step, self.config.decode_chunk_timeout_s,
                                     0 if not n_out else -1):
                yield delta
        except RouterError as err:
            raise stream_failure(err, dinfo.worker_id) from None
        finally:
            session.close(a.request_id)

    async def _cleanup(self, run: RequestRun) -> None:
        """Tell every worker involved to free the request (idempotent); then its id is free again."""
        try:
            await self._cancel_everywhere(run)
        finally:
            self._free_id(run.request_id)

    async def _cancel_everywhere(self, run: RequestRun) -> None:
        await self._release(run)  # normally released already, where it was taken
        await asyncio.gather(self._cancel_on(run.worker_request_id, list(run.workers.values())),
                             *(asyncio.shield(cancels) for cancels in run.abandoned))

    async def _cancel_on(self, worker_request_id: str, workers: list[WorkerInfo]) -> None:
        """Tell `workers` to free everything they hold for `worker_request_id` (idempotent)."""
        req = wpb.CancelRequest(request_id=worker_request_id)

        async def cancel(info: WorkerInfo) -> None:
            try:
                await self.channels.stub(info.address).Cancel(req, timeout=self.config.cancel_timeout_s)
            except grpc.aio.AioRpcError as err:
                log.info("Cancel(%s) on %s failed: %s", worker_request_id, info.worker_id, err.code().name)

        await asyncio.gather(*(cancel(w) for w in workers))

    async def close(self) -> None:
        """At shutdown: wait for pending cleanups, at most a Cancel RPC's timeout plus 1 s, then cancel the rest."""
        if self._cleanups:
            _, stuck = await asyncio.wait(set(self._cleanups), timeout=self.config.cancel_timeout_s + 1.0)
            for task in stuck:  # a stuck worker must not hold the shutdown; leases and counters expire anyway
                task.cancel()
                log.warning("shutdown: a cleanup did not finish in time; cancelled")
        await self.sessions.close()
