"""Run a real cluster (local Ray, redis-server, router, workers) from synchronous tests.

The router's grpc.aio server needs its event loop running, so the cluster lives on a loop in a
background thread; tests talk to it through the SDK like any user.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from pdserve.v1 import worker_pb2 as wpb
from pdserve.v1 import worker_pb2_grpc as wpb_grpc

from cluster.cluster_config import ClusterConfig
from cluster.grpc_auth import worker_channel
from cluster.launcher import Cluster

T = TypeVar("T")


class ClusterHarness:
    def __init__(self, config: ClusterConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        # tests count in-flight requests and queue limits per router: one process unless a test asks for more
        config = dataclasses.replace(config, router_processes=config.router_processes or 1)
        self.cluster: Cluster = self.run(Cluster.start(config, progress=False))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 180) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return self.cluster.address

    def worker_channel(self, address: str) -> grpc.Channel:
        """A channel to a worker's internal service that carries the cluster secret's token."""
        return worker_channel(address, self.cluster.secret)

    def worker_stats(self) -> list[wpb.WorkerStats]:
        """Each live worker's own report (GetStats over its internal gRPC service)."""
        stats = []
        for info in self.cluster.worker_info:
            with self.worker_channel(info["address"]) as ch:
                try:
                    stats.append(wpb_grpc.WorkerServiceStub(ch).GetStats(wpb.StatsRequest(), timeout=5))
                except grpc.RpcError:
                    continue  # a worker a test killed
        return stats

    def wait_all_blocks_free(self, timeout_s: float = 10.0) -> list[wpb.WorkerStats]:
        """Poll until every worker reports no running/waiting requests and all KV blocks free."""
        end = time.monotonic() + timeout_s
        while True:
            stats = self.worker_stats()
            if all(s.free_kv_blocks == s.total_kv_blocks and s.reserved_kv_blocks == 0 and s.num_running == 0
                   and s.num_waiting == 0 for s in stats):
                return stats
            if time.monotonic() > end:
                raise AssertionError(f"KV blocks still held after {timeout_s}s: {stats}")
            time.sleep(0.1)

    def close(self) -> None:
        try:
            self.run(self.cluster.shutdown(drain_s=2.0), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
