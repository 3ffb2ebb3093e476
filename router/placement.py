"""Where a request runs, and what it holds meanwhile: the registry side of the request path.

`_take_placement` is a request's first registry round trip (the decode worker with the most headroom and its
blocks, the prompt workers in the policy's order, the first one's inflight), `_release` its last (all of it
back in one call). Between them `_reserve` asks the picked decode worker for its blocks (the next roomiest
one when it is full or down) and `_place` runs a step on the prompt workers in order, the next one only while
a worker is unreachable. A worker unreachable at the address in the view is looked up again first: if it
re-registered elsewhere (its gRPC front end was restarted), it is tried there (`_attempt_at`).

Everything taken is recorded in `RequestRun.held` until it is given back, and a registry call cancelled while
its reply is on the way is undone when it lands (`_take`), so no counter outlives its request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import redis.exceptions
from pdserve.v1 import worker_pb2 as wpb

from cluster.prefix_hash import chain_block_hashes
from cluster.registry import AsyncRegistry, Placement, WorkerInfo, WorkerLoad
from router.channels import WorkerChannels
from router.config import RouterConfig
from router.errors import RouterError, worker_error
from router.policy import PrefillPolicy
from router.validation import ValidRequest
from router.worker_stream import what
from router.worker_view import WorkerView

log = logging.getLogger(__name__)
T = TypeVar("T")
Code = grpc.StatusCode
_ROOM_RETRY_S = 0.05  # a full decode worker is asked again this often (its heartbeat period is 0.5 s)


@dataclass
class Held:
    """The registry counters one request holds, given back together in one call (`WorkerPlacement._release`)."""

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


class WorkerPlacement:
    """Placement, reservation and registry bookkeeping for one router's requests (the base of
    `router.orchestrator.Orchestrator`, which runs the request path on it)."""

    def __init__(self, config: RouterConfig, registry: AsyncRegistry, channels: WorkerChannels,
                 policy: PrefillPolicy) -> None:
        self.config = config
        self.registry = registry
        self.channels = channels
        self.policy = policy
        self.view = WorkerView(registry)  # refreshed by the router's health loop; no request lists workers
        self._cleanups: set[asyncio.Task[Any]] = set()

    async def reg(self, coro: Awaitable[T]) -> T:
        """Await a registry call; Redis failures become UNAVAILABLE."""
        try:
            return await coro
        except redis.exceptions.RedisError as exc:
            raise RouterError(Code.UNAVAILABLE, f"worker registry (Redis) unavailable: {exc}") from None

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
