"""The router's cached view of the registered workers, so that no request reads the listing from Redis:
refreshed by the router's health loop, and at once when a request finds it stale (a role with no worker,
a worker id the registry picked that the view does not know yet, or a worker unreachable at its address)."""

from __future__ import annotations

import asyncio

from cluster.registry import AsyncRegistry, WorkerInfo, WorkerLoad

Worker = tuple[WorkerInfo, WorkerLoad]


class WorkerView:
    """Live workers as of the last refresh; concurrent refreshes share one registry call."""

    def __init__(self, registry: AsyncRegistry) -> None:
        self._registry = registry
        self._workers: list[Worker] = []
        self._by_id: dict[str, WorkerInfo] = {}
        self._reading: asyncio.Future[list[Worker]] | None = None

    @property
    def workers(self) -> list[Worker]:
        return self._workers

    async def refresh(self) -> list[Worker]:
        """Re-read the listing (RedisError if the registry is down; the view then stays as it was)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._read_done)
        return await asyncio.shield(self._reading)

    async def having(self, *roles: str) -> list[Worker]:
        """The workers, re-read first if the view lacks a worker of one of `roles`."""
        if not set(roles) <= {w.role for w, _ in self._workers}:
            return await self.refresh()
        return self._workers

    async def info(self, worker_id: str) -> WorkerInfo | None:
        """The worker's info; re-reads the view once if it does not know the worker (None: still unknown)."""
        if worker_id not in self._by_id:
            await self.refresh()
        return self._by_id.get(worker_id)

    async def moved(self, info: WorkerInfo) -> WorkerInfo | None:
        """After `info`'s worker was unreachable: re-reads the view; the worker's new info if it re-registered at
        another address (its gRPC front end was restarted), else None."""
        await self.refresh()
        now = self._by_id.get(info.worker_id)
        return now if now is not None and now.address != info.address else None

    async def _read(self) -> list[Worker]:
        workers = await self._registry.list_workers()
        self._workers, self._by_id = workers, {w.worker_id: w for w, _ in workers}
        return workers

    def _read_done(self, fut: asyncio.Future[list[Worker]]) -> None:
        self._reading = None
        if not fut.cancelled():
            fut.exception()  # retrieved here too: every caller may have been cancelled meanwhile
