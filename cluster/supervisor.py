"""The launcher's watch over what it started itself: a private redis-server that dies is started again on
the same port with the same arguments (torch-free).

Nothing else has to be told: the server is empty again, and every component finds its way back on its own
(workers re-register when a heartbeat finds their key gone, routers' connection pools reconnect on their
next call, and the router's health loop reads the workers again).
"""

from __future__ import annotations

import logging
import threading

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
