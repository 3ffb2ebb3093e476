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
`Orchestrator` runs the disaggregated flow; `router.colocated.ColocatedOrchestrator` replaces only an
attempt's flow (`_attempt`) and shares the rest: admission, attempts, placement (`_place`), registry
bookkeeping and cleanup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import redis.exceptions
from pdserve.v1 import generate_pb2 as pb
from pdserve.v1 import worker_pb2 as wpb

from cluster.prefix_hash import chain_block_hashes
from cluster.registry import AsyncRegistry, Placement, WorkerInfo, WorkerLoad
from cluster.wire import sampling_to_proto
from router.admission import Admission
from router.channels import WorkerChannels
from router.config import RouterConfig
from router.errors import RouterError, worker_error
from router.migration import AttemptFailed, Progress, handoff_failure, stream_failure
from router.model_info import ModelInfo
from router.policy import PrefillPolicy
from router.validation import ValidRequest, validate
from router.worker_sessions import WorkerSessions
from router.worker_stream import ms_since, relay, what
from router.worker_view import WorkerView

log = logging.getLogger(__name__)
T = TypeVar("T")
Code = grpc.StatusCode
_REUSE_GRACE_S = 0.5  # beyond the Cancel timeout, how long a reused request id waits for its old request
_ROOM_RETRY_S = 0.05  # a full decode worker is asked again this often (its heartbeat period is 0.5 s)


@dataclass
class Held:
    """The registry counters one request holds, given back together in one call (`Orchestrator._release`)."""

    decode: str | None  # decode worker whose `outstanding` counter holds `blocks`
    blocks: int
    inflight: str | None  # prompt worker whose inflight count covers the current attempt
    order: tuple[str, ...]  # prompt workers in the policy's order
    hashes: list[str]  # the prompt's block hashes (prefix_aware only)
    committed: bool = False  # the decode worker accepted its reservation


@dataclass
class RequestRun:
    """What one request holds on the workers and in the registry, for cleanup."""

    request_id: str
    workers: dict[str, WorkerInfo] = field(default_factory=dict)  # may hold state for the current attempt
    finished: bool = False
    held: Held | None = None  # registry counters taken and not yet released
    freeing: bool = False  # a cleanup was started while the request still ran (it frees the id)
    attempt: int = 0
    abandoned: list[asyncio.Future[None]] = field(default_factory=list)  # earlier attempts' Cancels, under way

    @property
    def worker_request_id(self) -> str:
        """The id the workers know the current attempt by: the client's, then "<id>#<attempt>" (no client id has
        a '#', so no other request's id ever equals it)."""
        return self.request_id if self.attempt == 0 else f"{self.request_id}#{self.attempt}"

    def next_attempt(self) -> tuple[str, list[WorkerInfo]]:
        """Start a new attempt; returns the one left behind (its id on the workers, and those workers)."""
        left = (self.worker_request_id, list(self.workers.values()))
        self.workers = {}
        self.attempt += 1
        return left


def _earliest(end: float, time_remaining: Callable[[], float | None]) -> Callable[[], float]:
    """A time_remaining that also stops at `end` (a perf_counter time)."""
    def left() -> float:
        call_left = time_remaining()
        own = end - time.perf_counter()
        return own if call_left is None else min(own, call_left)
    return left


class Orchestrator:
    """Runs Generate requests across the prefill and decode pools."""

    def __init__(self, config: RouterConfig, model: ModelInfo, registry: AsyncRegistry,
                 channels: WorkerChannels, policy: PrefillPolicy) -> None:
        self.config = config
        self.model = model
        self.registry = registry
        self.channels = channels
        self.policy = policy
        self.sessions = WorkerSessions(channels)  # the workers' output streams to this router
        self.view = WorkerView(registry)  # refreshed by the router's health loop; no request lists workers
        self._inflight: dict[str, asyncio.Future[None]] = {}  # ids in use -> done once freed on every worker
        self.admission = Admission(self._capacity, config.max_queue, config.queue_timeout_s,
                                   max_admitted=self._request_capacity)
        # Requests between their decode reservation and the end of their prefill: a few per prefill worker,
        # so decode blocks are reserved when the prefill is about to run, not while the prompt queues.
        self.prefill_stage = Admission(self._prefill_slots, config.max_queue, config.queue_timeout_s,
                                       unit="prefill slots")
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    async def reg(self, coro: Awaitable[T]) -> T:
        """Await a registry call; Redis failures become UNAVAILABLE."""
        try:
            return await coro
        except redis.exceptions.RedisError as exc:
            raise RouterError(Code.UNAVAILABLE, f"worker registry (Redis) unavailable: {exc}") from None

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

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Future[T]:  # tracked, so close() waits for it
        task = asyncio.ensure_future(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def _take(self, coro: Awaitable[T], undo: Callable[[T], Awaitable[Any]]) -> T:
        """Await a registry call that takes something; if the request is cancelled while the reply is on its
        way (Redis applied it), undo it once it lands, or it would stay counted until the counter's TTL."""
        task = asyncio.ensure_future(self.reg(coro))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            def undo_taken(t: asyncio.Task[T]) -> None:
                if not t.cancelled() and t.exception() is None and t.result() is not None:
                    self._spawn(self._quietly(undo(t.result())))
            task.add_done_callback(undo_taken)
            raise

    def _timeout(self, limit: float, time_remaining: Callable[[], float | None]) -> float:
        left = time_remaining()
        return limit if left is None else max(0.001, min(limit, left))

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

    async def _reserve_when_room(self, v: ValidRequest, decodes: list[tuple[WorkerInfo, WorkerLoad]],
                                 run: RequestRun, time_remaining: Callable[[], float | None],
                                 exclude: Collection[str] = ()) -> tuple[WorkerInfo, wpb.ReserveReply]:
        """`_reserve`, tried again while no decode worker has room yet, up to `queue_timeout_s`: admission
        counts blocks exactly, but the registry sees blocks freed only at the worker's next heartbeat. A
        prompt larger than every decode worker's pool is refused at once. Workers in `exclude` are not tried."""
        n_blocks = -(-len(v.token_ids) // decodes[0][0].block_size)
        end = time.perf_counter() + self.config.queue_timeout_s
        while True:
            try:
                return await self._reserve(v, decodes, run, time_remaining, exclude)
            except RouterError as err:
                live = [w for w, _ in self.view.workers  # the view as of now
                        if w.role == "decode" and w.worker_id not in exclude]
                if err.code == Code.RESOURCE_EXHAUSTED and not live:
                    raise RouterError(Code.UNAVAILABLE, f"no decode workers are live in cluster "
                                                        f"{self.config.cluster_name!r}") from None
                left = time_remaining()
                if (err.code != Code.RESOURCE_EXHAUSTED or not any(n_blocks <= w.total_kv_blocks for w in live)
                        or time.perf_counter() + _ROOM_RETRY_S > end or (left is not None and left < _ROOM_RETRY_S)):
                    raise
            await asyncio.sleep(_ROOM_RETRY_S)

    async def _reserve(self, v: ValidRequest, decodes: list[tuple[WorkerInfo, WorkerLoad]], run: RequestRun,
                       time_remaining: Callable[[], float | None],
                       exclude: Collection[str] = ()) -> tuple[WorkerInfo, wpb.ReserveReply]:
        """The request's placement in one registry call (`_take_placement`: the decode worker with the most
        headroom, its blocks held, and the prefill order `_place` follows), then that worker's own Reserve;
        the next roomiest one when it is full or down, or in `exclude` (more registry calls: the exceptional
        path). What was taken is released here on failure, else by `_place` after the prefill."""
        block_size = decodes[0][0].block_size
        n_blocks = -(-len(v.token_ids) // block_size)
        failures: list[str] = []
        req = wpb.ReserveRequest(request_id=v.request_id, num_tokens=len(v.token_ids),
                                 lease_ms=self.config.reserve_lease_ms)

        async def reserve(info: WorkerInfo, name: str) -> wpb.ReserveReply:
            try:
                return await self.channels.stub(info.address).Reserve(
                    req, timeout=self._timeout(self.config.reserve_timeout_s, time_remaining))
            except grpc.aio.AioRpcError as err:
                raise worker_error(err, name) from None

        try:
            await self._take_placement(v, run, n_blocks, block_size)
            held = run.held
            tried: set[str] = set()
            while held is not None and held.decode is not None:
                wid = held.decode
                if wid not in exclude:
                    tried.add(wid)
                    info = await self.reg(self.view.info(wid))
                    if info is not None:  # None: gone from the registry since the pick
                        try:
                            reply = await self._attempt_at(run, info, "reserve", reserve)
                            held.committed = True
                            return run.workers[wid], reply
                        except RouterError as err:
                            if err.code not in (Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE):
                                raise
                            failures.append(f"{err.code.name} {err.reason}")
                    if len(tried) >= self.config.max_decode_attempts:
                        break
                held.decode = None
                await self._quietly(self.registry.release_decode(wid, n_blocks))
                held.decode = await self._take(
                    self.registry.reserve_decode(n_blocks, exclude=sorted(tried.union(exclude))),
                    lambda w: self.registry.release_decode(w, n_blocks))
        except BaseException:
            await self._release(run)
            raise
        await self._release(run)
        if failures:
            code = Code.UNAVAILABLE if all("UNAVAILABLE" in f for f in failures) else Code.RESOURCE_EXHAUSTED
            raise RouterError(code, f"no decode worker could reserve {n_blocks} KV blocks: {'; '.join(failures)}")
        raise RouterError(Code.RESOURCE_EXHAUSTED, f"no decode worker has room for {n_blocks} KV blocks "
                                                   f"({len(decodes)} decode workers registered)")

    async def _take_placement(self, v: ValidRequest, run: RequestRun, decode_blocks: int | None,
                              block_size: int) -> Placement:
        """The request's first registry round trip (`AsyncRegistry.place`): the decode pick with its blocks
        (when `decode_blocks` is given) and the prompt workers in the policy's order, the first one's
        inflight counted. Sets `run.held` unless nothing was taken: no decode room (`missing`), or no live
        prompt worker (UNAVAILABLE)."""
        role = self.config.serving_roles[0]
        hashes = chain_block_hashes(v.token_ids, block_size) if self.policy.uses_prefixes else []
        placed = await self._take(
            self.registry.place(role, self.policy.name, decode_blocks=decode_blocks, block_hashes=hashes,
                                load_slack=self.policy.load_slack, prefix_ttl_s=self.config.prefix_ttl_s,
                                max_prompt_workers=self.config.max_prefill_attempts),
            lambda p: self.registry.release(decode=p.decode, decode_blocks=decode_blocks or 0,
                                            inflight=p.prompt[0] if p.prompt else None))
        if placed.missing == role:
            raise RouterError(Code.UNAVAILABLE, f"no {role} workers are live in cluster {self.config.cluster_name!r}")
        if not placed.missing:
            run.held = Held(placed.decode, decode_blocks or 0, placed.prompt[0], placed.prompt, hashes)
        return placed

    async def _release(self, run: RequestRun) -> None:
        """The request's last registry round trip: give back every counter it still holds (idempotent)."""
        held, run.held = run.held, None
        if held is not None:
            await self._quietly(self.registry.release(decode=held.decode, decode_blocks=held.blocks,
                                                      committed=held.committed, inflight=held.inflight))

    async def _prefill(self, v: ValidRequest, prefills: list[tuple[WorkerInfo, WorkerLoad]],
                       req: wpb.PrefillRequest, run: RequestRun, time_remaining: Callable[[], float | None],
                       avoid: Collection[str] = ()) -> tuple[WorkerInfo, wpb.PrefillReply]:
        """Prefill on the policy's choice (see `_place`; workers in `avoid` last). `time_remaining` is bounded by
        the decode reservation's lease: KV pushed later has nowhere to go."""
        async def prefill(info: WorkerInfo, name: str) -> wpb.PrefillReply:
            try:
                return await self.channels.stub(info.address).Prefill(
                    req, timeout=self._timeout(self.config.prefill_timeout_s, time_remaining))
            except grpc.aio.AioRpcError as err:
                raise worker_error(err, name) from None

        return await self._place(v, prefills, run, "prefill", prefill, avoid=avoid)

    async def _place(self, v: ValidRequest, workers: list[tuple[WorkerInfo, WorkerLoad]], run: RequestRun,
                     step: str, attempt: Callable[[WorkerInfo, str], Awaitable[T]],
                     keep_inflight: bool = False, avoid: Collection[str] = ()) -> tuple[WorkerInfo, T]:
        """`attempt(worker, what)` on the policy's choice among the live `workers`, the next choice only while
        a worker is unreachable (UNAVAILABLE). The placement `_reserve` took orders them and counts the first
        one's inflight (with nothing taken yet, as in colocated mode, one registry call here takes it); workers
        in `avoid` go last; trying another worker moves the count there. At the end one registry call releases
        all the request holds (`_release`, the decode blocks too), unless `keep_inflight` after a success:
        then the caller does, once the worker is done with the request."""
        kept = False
        try:
            if run.held is None:
                await self._take_placement(v, run, None, workers[0][0].block_size)
            held = run.held
            order = sorted(held.order, key=lambda w: w in avoid) if held is not None else []
            for i, wid in enumerate(order):
                if held is not None and held.inflight != wid:
                    await self._move_inflight(held, wid)
                info = await self.reg(self.view.info(wid))
                if info is None:  # gone from the registry since the pick
                    continue
                try:
                    result = await self._attempt_at(run, info, step, attempt)
                    kept = keep_inflight
                    return run.workers[wid], result
                except RouterError as err:
                    if err.code == Code.UNAVAILABLE and i + 1 < len(order):
                        log.warning("%s: %s; trying the next worker", what(step, run.workers[wid]), err.reason)
                        continue
                    raise
        finally:
            if not kept:
                await self._release(run)
        raise RouterError(Code.UNAVAILABLE, f"no worker could be tried for {step}")

    async def _attempt_at(self, run: RequestRun, info: WorkerInfo, step: str,
                          attempt: Callable[[WorkerInfo, str], Awaitable[T]]) -> T:
        """`attempt` on the worker; if it is unreachable there and has re-registered at another address (its
        front end was restarted) since the view was read, once more at the new one."""
        run.workers[info.worker_id] = info
        try:
            return await attempt(info, what(step, info))
        except RouterError as err:
            if err.code != Code.UNAVAILABLE or (moved := await self.reg(self.view.moved(info))) is None:
                raise
        log.info("worker %s moved from %s to %s", info.worker_id, info.address, moved.address)
        run.workers[info.worker_id] = moved
        return await attempt(moved, what(step, moved))

    async def _move_inflight(self, held: Held, worker_id: str) -> None:
        """A retry on the next prompt worker: its inflight count instead of the previous one's (and the
        prompt's blocks noted as cached there, for prefix_aware)."""
        old, held.inflight = held.inflight, None
        await self._quietly(self.registry.release(inflight=old))
        await self._take(self.registry.incr_inflight(worker_id), lambda _: self.registry.decr_inflight(worker_id))
        held.inflight = worker_id
        if held.hashes:
            await self._quietly(self.registry.record_prefixes(worker_id, held.hashes, self.config.prefix_ttl_s))

    async def _quietly(self, coro: Awaitable[Any]) -> None:
        """Bookkeeping that must not mask the request's own outcome (and survives a second cancel)."""
        try:
            await asyncio.shield(coro)
        except Exception as exc:  # noqa: BLE001 - logged; the counters also expire on their own
            log.warning("registry bookkeeping failed: %s", exc)

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
