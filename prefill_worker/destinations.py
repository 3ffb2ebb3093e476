"""Where a prefill worker may push KV: the KV endpoints of the decode workers the registry lists (with the
cluster secret, only entries it signed), cached.

A Prefill whose destination is not one of them is refused before the forward and before any connection:
the router takes destinations from the same registry, so whoever else can call a prefill worker cannot
make it connect to an arbitrary host:port. A miss re-reads the listing once (a decode worker that joined
since the last read), and so does a listing older than a registration's lifetime (a decode worker that left).
"""

from __future__ import annotations

import asyncio
import logging
import time

from pdserve.v1 import worker_pb2 as wpb

from cluster.registry import AsyncRegistry, WorkerInfo

log = logging.getLogger(__name__)


class DecodeDestinations:
    """The registered decode workers, by id; concurrent re-reads share one registry call."""

    def __init__(self, registry: AsyncRegistry, max_age_s: float) -> None:
        self._registry = registry
        self._max_age_s = max_age_s
        self._by_id: dict[str, WorkerInfo] = {}
        self._read_at = float("-inf")
        self._reading: asyncio.Future[None] | None = None

    async def refusal(self, dest: wpb.KVDestination) -> str:
        """Why `dest` is not a registered decode worker's KV endpoint; "" when it is. Raises the registry's
        error when the listing cannot be read and the cached one does not vouch for `dest`."""
        if time.monotonic() - self._read_at > self._max_age_s:
            try:
                await self._refresh()
            except Exception as e:  # Redis down for a moment: the last listing still vouches for its workers
                log.warning("could not re-read the decode workers: %s", e)
        if not self._why(dest):
            return ""
        await self._refresh()
        return self._why(dest)

    def _why(self, dest: wpb.KVDestination) -> str:
        info = self._by_id.get(dest.worker_id)
        if info is None:
            return f"KV destination {dest.worker_id!r} is not a registered decode worker"
        if (dest.transport, dest.transport_endpoint) != (info.transport, info.transport_endpoint):
            return (f"KV destination {dest.transport}:{dest.transport_endpoint!r} is not where decode worker "
                    f"{dest.worker_id!r} registered its KV endpoint")
        return ""

    async def _refresh(self) -> None:
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._read_done)
        await asyncio.shield(self._reading)

    async def _read(self) -> None:
        started = time.monotonic()
        workers = await self._registry.list_workers("decode")
        self._by_id, self._read_at = {w.worker_id: w for w, _ in workers}, started

    def _read_done(self, fut: asyncio.Future[None]) -> None:
        self._reading = None
        if not fut.cancelled():
            fut.exception()  # retrieved here too: every caller may have been cancelled meanwhile
