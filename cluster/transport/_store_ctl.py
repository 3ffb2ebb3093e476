"""A tiny control channel over a torch.distributed TCPStore hosted by the receiver.

The receiver runs the store (port 0, so the OS picks the port; it is the endpoint's port). Senders push
JSON messages onto one queue, CTL_QUEUE; a single dispatcher thread on the receiver pops them (a blocking
pop: no polling, no timeout log spam) and hands each to a callback. Replies go back through per-pair
queues, `reply_key(pair)`, which only that pair's sender pops. `store.add(PAIR_COUNTER, 1)` hands out
pair ids, so any number of senders can attach at any time without a global world.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from cluster.transport.base import TransportError, format_endpoint, parse_endpoint

log = logging.getLogger(__name__)
T = TypeVar("T")

CTL_QUEUE = "ctl"
PAIR_COUNTER = "pair_counter"
_STOP = "__stop__"
_IDLE_POP = timedelta(days=1)  # the dispatcher's blocking pop; close() wakes it with _STOP


def reply_key(pair: int) -> str:
    return f"reply/{pair}"


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=max(seconds, 0.001))


class StoreServer:
    """Receiver side: hosts the store and dispatches control messages on one background thread."""

    def __init__(self, host: str, on_message: Callable[[dict[str, Any]], None], name: str) -> None:
        self._master = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                     timeout=timedelta(seconds=30))
        self.host = host
        self.port = int(self._master.port)
        self.endpoint = format_endpoint(host, self.port)
        self._on_message = on_message
        self._reply_lock = threading.Lock()
        self._replier: dist.TCPStore | None = self.client(timedelta(seconds=30))
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"{name}-ctl", daemon=True)
        self._thread.start()

    def client(self, timeout: timedelta) -> dist.TCPStore:
        """A fresh client connection (one per thread that blocks on the store)."""
        return dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout)

    def reply(self, pair: int, msg: dict[str, Any]) -> None:
        with self._reply_lock:
            if self._replier is not None:  # else closed: the sender will see the store go away
                self._replier.queue_push(reply_key(pair), json.dumps(msg))

    def _loop(self) -> None:
        store = self.client(_IDLE_POP)
        while True:
            try:
                raw = store.queue_pop(CTL_QUEUE, block=True)
            except dist.DistStoreError:  # a day without messages, or the store is going away
                if self._closed:
                    return
                continue
            if raw.decode() == _STOP:
                return
            try:
                self._on_message(json.loads(raw))
            except Exception:  # a bad message must not kill the dispatcher
                log.exception("KV transport control message failed: %r", raw[:200])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._reply_lock:
                self._replier.queue_push(CTL_QUEUE, _STOP)
            self._thread.join(timeout=5)
        except dist.DistError:
            pass
        with self._reply_lock:
            self._replier = None
        self._master = None  # type: ignore[assignment]  # drops the server


def bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` on a helper thread; raise TransportError if it has not returned within `timeout_s`.

    TCPStore client calls cannot be trusted to honour their timeouts against a peer that is alive but
    unresponsive (e.g. a timed-out `wait` then blocks, unbounded, on the server's answer to its cancel).
    The abandoned call keeps running on its daemon thread; the caller must not reuse that connection.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="kv-bounded-call", daemon=True).start()
    if not done.wait(max(timeout_s, 0.0)):
        raise TransportError(f"{what}: no answer within {timeout_s:.3g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class StoreClient:
    """Sender side: one connection to one receiver's store, holding one pair id.

    Every call is bounded (see `bounded`); after any TransportError the client must be discarded.
    """

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        host, port = parse_endpoint(endpoint)
        self.endpoint = endpoint
        # Fail fast on a dead receiver: TCPStore itself retries a refused connect until its timeout.
        try:
            socket.create_connection((host, port), timeout=max(timeout_s, 0.001)).close()
        except OSError as e:
            raise TransportError(f"KV receiver {endpoint} unreachable: {e}") from e

        def connect() -> tuple[dist.TCPStore, int]:
            store = dist.TCPStore(host, port, is_master=False, timeout=_td(timeout_s))
            return store, int(store.add(PAIR_COUNTER, 1))

        self.store, self.pair = self._call(connect, timeout_s, "connect")

    def _call(self, fn: Callable[[], T], timeout_s: float, what: str) -> T:
        try:
            return bounded(fn, timeout_s, f"KV receiver {self.endpoint}: {what}")
        except dist.DistError as e:
            raise TransportError(f"KV receiver {self.endpoint}: {what} failed: {_line(e)}") from e

    def push(self, msg: dict[str, Any], timeout_s: float) -> None:
        raw = json.dumps({**msg, "pair": self.pair})

        def push() -> None:
            self.store.set_timeout(_td(timeout_s))
            self.store.queue_push(CTL_QUEUE, raw)

        self._call(push, timeout_s, "control message")

    def wait_reply(self, timeout_s: float) -> dict[str, Any]:
        key = reply_key(self.pair)

        def wait() -> bytes:
            self.store.set_timeout(_td(timeout_s))
            self.store.wait([key], _td(timeout_s))
            return self.store.queue_pop(key, block=False)

        return json.loads(self._call(wait, timeout_s, "reply"))
