"""A running worker: engine thread + the role's servicer (and its KV transport) + the gRPC front end (its own
process) + registry heartbeat.

`WorkerServer.start()` loads the model, starts the front end, registers in Redis and heartbeats its load;
`drain()` deregisters (routers stop placing requests here) and waits for running requests to finish;
`stop()` tears everything down. Every role uses it; it is given the role's servicer class and never imports
the roles.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import uuid

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.registry import AsyncRegistry, WorkerInfo, WorkerLoad
from cluster.worker.config import NO_TRANSPORT, WorkerConfig
from cluster.worker.engine_loop import EngineLoop
from cluster.worker.frontend_link import FrontendLink
from cluster.worker.service_base import WorkerServicerBase

log = logging.getLogger(__name__)
_MIN_BEAT_GAP_S = 0.02  # early heartbeats (KV blocks freed) at most this often


class WorkerServer:
    def __init__(self, config: WorkerConfig, servicer_cls: type[WorkerServicerBase]) -> None:
        self.config = config
        self.servicer_cls = servicer_cls
        self.worker_id = config.worker_id or f"{config.role}-{uuid.uuid4().hex[:8]}"
        self.address = ""
        self.loop: EngineLoop | None = None
        self.servicer: WorkerServicerBase | None = None
        self._frontend: FrontendLink | None = None
        self._restarting: asyncio.Future[None] | None = None
        self._registry: AsyncRegistry | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._blocks_freed = asyncio.Event()
        self._info: WorkerInfo | None = None

    async def start(self) -> str:
        """Load the model, start serving and register; returns the worker's gRPC address."""
        cfg = self.config
        sys.setswitchinterval(cfg.gil_switch_interval_ms / 1e3)  # the whole process: one worker per process
        engine = await asyncio.to_thread(LLMEngine, self._engine_config())
        self.loop = EngineLoop(engine)
        self._registry = AsyncRegistry(cfg.redis_url, cfg.cluster_name, secret=cfg.cluster_secret)
        self.servicer = await self.servicer_cls.create(cfg, self.worker_id, self.loop, self._registry)
        self._frontend = FrontendLink(self.servicer, self.loop, cfg.host, cfg.cluster_secret,
                                      on_lost=self._frontend_lost)
        port = await self._frontend.start()
        self.address = f"{cfg.host}:{port}"
        stats = self.loop.stats
        transport = self.servicer.transport
        self._info = WorkerInfo(
            worker_id=self.worker_id, role=cfg.role, address=self.address, model=cfg.engine.model,
            transport=transport.name if transport is not None else NO_TRANSPORT,
            transport_endpoint=self.servicer.endpoint,
            total_kv_blocks=stats.num_total_blocks, block_size=cfg.engine.block_size,
            max_requests=cfg.engine.max_num_seqs + cfg.max_queue)
        await self._registry.register(self._info, self._ttl, self._load())
        aio_loop = asyncio.get_running_loop()
        self.loop.on_blocks_freed = lambda: aio_loop.call_soon_threadsafe(self._blocks_freed.set)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        log.info("worker %s (%s) serving on %s", self.worker_id, cfg.role, self.address)
        return self.address

    def _engine_config(self) -> EngineConfig:
        """The role's engine. A decode worker keeps no prefix cache: its prompts arrive as KV, it never prefills
        them, and without one its block manager grows sequences into the lowest free ids, which keeps the
        blocks of the next KV handoff in few runs (see `LLMEngine`, where that growth policy is chosen)."""
        if self.config.role == "decode":
            return dataclasses.replace(self.config.engine, enable_prefix_caching=False)
        return self.config.engine

    def _frontend_lost(self) -> None:
        """The front end process died: abort what its streams carried, start another, re-register there."""
        assert self.loop is not None
        self.loop.abort_routed()
        self._restarting = asyncio.ensure_future(self._restart_frontend())

    async def _restart_frontend(self) -> None:
        assert self._frontend is not None and self._registry is not None and self._info is not None
        try:
            port = await self._frontend.start()
        except Exception:
            log.exception("worker %s: its gRPC front end could not be restarted; leaving the cluster", self.worker_id)
            await self._registry.deregister(self.worker_id)
            return
        self.address = f"{self.config.host}:{port}"
        self._info = dataclasses.replace(self._info, address=self.address)
        await self._registry.register(self._info, self._ttl, self._load())
        log.warning("worker %s: gRPC front end restarted on %s", self.worker_id, self.address)

    @property
    def _ttl(self) -> float:
        return self.config.registration_ttl_s

    def _load(self) -> WorkerLoad:
        assert self.servicer is not None
        waiting, running, free, reserved = self.servicer.load_counts()
        return WorkerLoad(num_waiting=waiting, num_running=running, free_kv_blocks=free,
                          reserved_kv_blocks=reserved)

    async def _heartbeat_loop(self) -> None:
        """Publish the load every `heartbeat_s`, and right after KV blocks are freed. Routers subtract the
        blocks they reserve from the published count themselves, but only the worker knows when blocks come
        back (a request ends or is cancelled, a lease runs out): until it says so, routers would turn
        requests away from room that is free."""
        assert self._registry is not None and self._info is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._blocks_freed.wait(), self.config.heartbeat_s)
            self._blocks_freed.clear()
            try:
                if not await self._registry.heartbeat(self.worker_id, self._load(), self._ttl):
                    await self._registry.register(self._info, self._ttl, self._load())
            except Exception as e:  # Redis down for a moment: keep serving, try again next beat
                log.warning("heartbeat failed: %s", e)
            await asyncio.sleep(_MIN_BEAT_GAP_S)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Stop taking new requests (deregister) and wait until running ones are done."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._registry is not None:
            with contextlib.suppress(Exception):
                await self._registry.deregister(self.worker_id)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while self.loop is not None and loop.time() < end:
            s = self.loop.stats
            if s.num_waiting == 0 and s.num_running == 0 and s.num_reserved_blocks == 0:
                break
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._restarting is not None:
            self._restarting.cancel()
        if self._registry is not None:
            with contextlib.suppress(Exception):
                await self._registry.deregister(self.worker_id)
            await self._registry.aclose()
        if self._frontend is not None:
            await asyncio.to_thread(self._frontend.stop)
        if self.servicer is not None:
            self.servicer.close()
        if self.loop is not None:
            self.loop.stop()
