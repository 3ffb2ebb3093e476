"""Admission control: the router runs at once only what its workers can hold, the rest waits its turn.

A request costs the KV blocks it needs to run to its end (prompt + max_tokens). The router admits requests
while the blocks of those it has admitted fit the serving workers' KV pools (their `total_kv_blocks` from
the cached worker view: decode workers, or colocated ones) and their number fits what those workers hold at
once (`max_requests`: running plus their own queues); one request is always admitted, so a request
too big for any worker still gets the worker's own answer. The others wait in one FIFO queue (a request
never overtakes an older one, so a big request is not starved by small ones) for at most
`queue_timeout_s`. The queue is bounded by `max_queue` (admitted + waiting); beyond it, or past the wait,
a request ends at once with RESOURCE_EXHAUSTED naming the limit. Waiting requests touch neither Redis nor
a worker, so an overload costs the router a list entry, not a connection or a worker's queue slot.

Each router process admits against the whole pools: with several routers, the workers' own limits (a full
queue, no room for a reservation) are what refuses their excess, also with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

import grpc

from router.errors import RouterError

Code = grpc.StatusCode


class Admission:
    """Admitted requests' costs against `capacity()` (blocks in the serving pools), a FIFO of waiters. The
    same gate with a cost of 1 and a capacity in slots bounds the requests in the prefill stage."""

    def __init__(self, capacity: Callable[[], int], max_queue: int, queue_timeout_s: float,
                 unit: str = "KV blocks", max_admitted: Callable[[], int] | None = None) -> None:
        self._capacity = capacity
        self._max_admitted = max_admitted  # requests the pools hold at once; None: only `capacity` bounds them
        self.unit = unit  # what `capacity` counts, for the reasons
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.admitted = 0  # requests running
        self.blocks = 0  # their blocks
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, cost: int) -> bool:
        if self.admitted == 0:
            return True
        if self._max_admitted is not None and self.admitted >= self._max_admitted():
            return False
        return self.blocks + cost <= self._capacity()

    def check_room(self) -> None:
        """RESOURCE_EXHAUSTED at once when the router holds `max_queue` requests (admitted + waiting)."""
        held = self.admitted + len(self._waiting)
        if held >= self.max_queue:
            raise RouterError(Code.RESOURCE_EXHAUSTED, f"router queue is full ({self.admitted} running, "
                                                       f"{len(self._waiting)} waiting, max_queue={self.max_queue})")

    @contextlib.asynccontextmanager
    async def admit(self, cost: int, time_remaining: Callable[[], float | None]) -> AsyncIterator[None]:
        """Hold `cost` blocks of the pools while the block runs; waits its turn first (see the module)."""
        self.check_room()
        self._pump()  # the pools may have grown (a worker joined) since the last release
        if not self._waiting and self._fits(cost):
            self._take(cost)
        else:
            await self._wait(cost, time_remaining)
        try:
            yield
        finally:
            self.admitted -= 1
            self.blocks -= cost
            self._pump()

    def _take(self, cost: int) -> None:
        self.admitted += 1
        self.blocks += cost

    async def _wait(self, cost: int, time_remaining: Callable[[], float | None]) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, fut)
        self._waiting.append(entry)
        left = time_remaining()
        limit = self.queue_timeout_s if left is None else min(self.queue_timeout_s, left)
        try:
            try:
                await asyncio.wait_for(asyncio.shield(fut), max(0.0, limit))
            except TimeoutError:
                raise RouterError(Code.RESOURCE_EXHAUSTED, self._timed_out(cost, limit)) from None
        except BaseException:
            if fut.done() and not fut.cancelled():  # admitted just as it gave up: hand the turn on
                self.admitted -= 1
                self.blocks -= cost
            with contextlib.suppress(ValueError):
                self._waiting.remove(entry)
            self._pump()
            raise

    def _timed_out(self, cost: int, limit: float) -> str:
        held = "" if self._max_admitted is None else f" (the workers hold {self._max_admitted()} at once)"
        return (f"no capacity within {limit:g}s (queue_timeout_s={self.queue_timeout_s:g}): {self.admitted} "
                f"requests running{held} hold {self.blocks} of {self._capacity()} {self.unit}, this one needs "
                f"{cost}, {len(self._waiting)} waiting")

    def _pump(self) -> None:
        """Admit waiters in order while the head fits."""
        while self._waiting and self._fits(self._waiting[0][0]):
            cost, fut = self._waiting.popleft()
            if fut.done():
                continue
            self._take(cost)
            fut.set_result(None)
