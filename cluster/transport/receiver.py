"""The one `KVReceiver`: the receive bookkeeping (`Expectations`) plus a transport's `ReceiveServer`, which
accepts senders on threads of its own and writes their KV into the cache under the bookkeeping's claims."""

from __future__ import annotations

import threading
from typing import Protocol

from cluster.transport.api import TransportError
from cluster.transport.expectations import Expectations


class ReceiveServer(Protocol):
    """One transport's receiving half, built over the cache and the receiver's `Expectations`."""

    def start(self) -> str:
        """Start accepting senders (called once); return the endpoint."""

    def close(self) -> None:
        """Stop accepting, end every connection and wait for the threads that write into the cache."""


class Receiver:
    """A decode worker's end of a KV transport (see `api.KVReceiver`)."""

    def __init__(self, name: str, server: ReceiveServer, expected: Expectations) -> None:
        self.name = name
        self._server = server
        self._expected = expected
        self._lock = threading.Lock()
        self._endpoint: str | None = None
        self._closed = False

    def listen(self) -> str:
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            if self._endpoint is None:
                self._endpoint = self._server.start()
            return self._endpoint

    def expect(self, request_id: str, dst_block_ids: list[int]) -> None:
        self._expected.expect(request_id, dst_block_ids)

    def wait_received(self, request_id: str, timeout_s: float) -> None:
        self._expected.wait(request_id, timeout_s)

    def poll_received(self) -> list[str]:
        return self._expected.poll()

    def forget(self, request_id: str) -> None:
        self._expected.forget(request_id)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._endpoint is not None
        if started:
            self._server.close()
