"""The launcher's watch over what it started itself (torch-free): a private redis-server that dies is started
again on the same port with the same arguments; a worker actor that dies is replaced by a new one on its
placement bundle, with the same worker id, which registers like any worker that joins.

Nothing else has to be told: the server is empty again, and every component finds its way back on its own
(workers re-register when a heartbeat finds their key gone, routers' connection pools reconnect on their
next call, and the router's health loop reads the workers again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from cluster.redis_server import RedisServer

log = logging.getLogger(__name__)


class RedisSupervisor:
    """A daemon thread polling the server's process every `interval_s`; restarts it when it has exited."""

    def __init__(self, redis: RedisServer, interval_s: float = 0.2) -> None:
        self.redis = redis
        self.interval_s = interval_s
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-supervisor", daemon=True)

    def start(self) -> RedisSupervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the launcher stops the server itself)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.redis.running:
                continue
            log.warning("redis-server on port %s exited; starting it again", self.redis.port)
            try:
                self.redis.stop()  # its process is gone: this only cleans up
                self.redis.start()  # the same port and arguments
                self.restarts += 1
                log.warning("redis-server is back on port %s", self.redis.port)
            except RuntimeError as exc:
                log.error("cannot restart redis-server: %s (trying again)", exc)


class WorkerSupervisor:
    """Polls every worker actor (a `stats` call) every `interval_s`; one that Ray reports dead is replaced by
    `new_worker(index)` and started. `workers` and `worker_info` are the launcher's lists, kept current."""

    def __init__(self, workers: list[Any], worker_info: list[dict[str, str]], new_worker: Callable[[int], Any],
                 interval_s: float = 0.5, call_timeout_s: float = 5.0) -> None:
        self.workers = workers
        self.worker_info = worker_info
        self._new_worker = new_worker
        self.interval_s = interval_s
        self.call_timeout_s = call_timeout_s
        self.replaced = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> WorkerSupervisor:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            for i in range(len(self.workers)):
                if await self._dead(self.workers[i]):
                    await self._replace(i)

    async def _dead(self, worker: Any) -> bool:
        import ray

        try:
            await asyncio.wait_for(worker.stats.remote(), self.call_timeout_s)
        except ray.exceptions.RayActorError:
            return True
        except (TimeoutError, ray.exceptions.RayError):  # busy or unreachable for now: not known dead
            return False
        return False

    async def _replace(self, i: int) -> None:
        old = self.worker_info[i] if i < len(self.worker_info) else {}
        log.warning("worker %s died; starting a new one", old.get("worker_id", i))
        import ray

        worker = self._new_worker(i)
        try:
            info = await worker.start.remote()
        except Exception as exc:  # noqa: BLE001 - logged; tried again at the next poll
            log.error("cannot replace worker %s: %s", old.get("worker_id", i), exc)
            ray.kill(worker)  # its bundle is free again for the next try
            return
        self.workers[i] = worker
        if i < len(self.worker_info):
            self.worker_info[i] = info
        self.replaced += 1
        log.warning("worker %s is back on %s", info["worker_id"], info["address"])
