"""Cached grpc.aio channels and WorkerService stubs, one per worker address; every call carries the cluster's
worker token (`cluster.secret`)."""

from __future__ import annotations

import grpc
from pdserve.v1 import worker_pb2_grpc

from cluster.grpc_auth import aio_interceptors

_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


class WorkerChannels:
    """One channel per `host:port`, created on first use and reused by every request.

    Channels of workers that went away are kept until `close()` (a channel to a dead address only backs
    off its reconnects; closing it could cut a stream still running to a worker that merely missed a
    heartbeat)."""

    def __init__(self, secret: str = "") -> None:
        self._interceptors = aio_interceptors(secret)
        self._channels: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerServiceStub]] = {}

    def stub(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address, options=_OPTIONS, interceptors=self._interceptors)
            entry = (channel, worker_pb2_grpc.WorkerServiceStub(channel))
            self._channels[address] = entry
        return entry[1]

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()
