"""The KV transport interface, plus the receiver-side bookkeeping every transport shares.

A transport moves one request's KV blocks from the sender's paged cache into blocks the receiver has
reserved. The receiver announces each reservation with `expect()` *before* the sender is told the
destination ids; anything that arrives for an id it does not expect (never announced, forgotten, or
already landed) is dropped and the sender's `send()` raises `TransportError`.

Receiver-side state machine per request id (all under one lock):

    expect() -> EXPECTED --_claim()--> WRITING --_finish(ok)--> LANDED --wait_received()/poll_received()--> gone
                                                \\--_finish(fail)--> EXPECTED (a retry may land later)
    forget(): EXPECTED/LANDED -> gone at once; WRITING -> waits until the write ends (or its deadline)

`forget()` never returns while a write into the request's blocks may still be under way, so after it
returns the caller may hand the blocks to another request. Implementations call `_claim()` just before
writing into the cache and `_finish()` right after (the write complete, also on the GPU).

The receiver's view is authoritative: a `send()` that raised a plain TransportError (a timeout, a lost
reply) may still have landed; a retry of the same request then gets TransportRejected ("already landed").
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from cluster.engine.kv_layout import KVLayout


class TransportError(RuntimeError):
    """A send failed: receiver unreachable or dead, timeout, or the receiver rejected the data."""


class TransportRejected(TransportError):
    """The receiver is alive but dropped the data (request not expected, forgotten, or mismatched)."""


@dataclass
class _Expected:
    dst_block_ids: list[int]
    state: str = "expected"  # "expected" | "writing" | "landed"
    write_deadline: float = 0.0  # monotonic; a writer that has not finished by then is presumed dead
    error: str | None = None  # why the last write failed (kept for wait_received's message)


class KVTransport(ABC):
    """Moves a request's KV blocks from a sender's cache into reserved blocks of a receiver's cache.

    One object per worker serves both roles: a prefill worker calls `send`, a decode worker calls
    `listen` once and then `expect` / `wait_received` (or `poll_received`) / `forget` per request.
    All methods are thread-safe. `send` may be called concurrently to different or equal endpoints.
    """

    name: ClassVar[str]

    def __init__(self, layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1", secret: str = "") -> None:
        """`cache` is the engine's whole paged cache (written in place); `host` is the address `listen`
        binds where it can and puts in the endpoint: the worker's reachable address for cross-host use;
        `secret` (the cluster's) authenticates both ends of every connection."""
        expected_shape = layout.cache_shape(cache.shape[2]) if cache.dim() == 6 else None
        if expected_shape is None or tuple(cache.shape) != expected_shape or cache.dtype != layout.dtype:
            raise ValueError(f"cache {tuple(cache.shape)}/{cache.dtype} does not match layout {layout}")
        if not cache.is_contiguous():
            raise ValueError("the KV cache must be contiguous")
        self.layout = layout
        self.cache = cache
        self.host = host
        self.secret = secret
        self._cv = threading.Condition()
        self._expected: dict[str, _Expected] = {}

    # --- the interface ---------------------------------------------------------------------------------
    @abstractmethod
    def listen(self) -> str:
        """Receiver: start accepting transfers (idempotent); return the endpoint string to publish."""

    @abstractmethod
    def send(self, endpoint: str, request_id: str, src_block_ids: list[int], dst_block_ids: list[int],
             timeout_s: float) -> None:
        """Sender: copy `cache[:, :, src]` into the receiver's `cache[:, :, dst]`.

        Returns once the receiver holds the data in its cache. Raises `TransportError` (never hangs past
        `timeout_s`, give or take connection set-up) when the receiver is unreachable, dies, is too slow,
        or rejects the data (`TransportRejected`).
        """

    @abstractmethod
    def close(self) -> None:
        """Stop background threads and release connections; the cache itself is left alone."""

    def open_send(self, endpoint: str, request_id: str, dst_block_ids: list[int], timeout_s: float) -> KVSendStream:
        """Sender: start a handoff whose layers are sent as the prefill produces them (see `KVSendStream`).

        Connects to the receiver if needed (may block up to `timeout_s`); sends nothing yet. Transports
        that cannot stream return a stream that does one `send` at `finish`.
        """
        return _BulkSendStream(self, endpoint, request_id, list(dst_block_ids), timeout_s)

    def expect(self, request_id: str, dst_block_ids: list[int]) -> None:
        """Receiver: announce that `request_id`'s KV will land in `dst_block_ids` (reserved by the caller)."""
        with self._cv:
            cur = self._expected.get(request_id)
            if cur is not None and cur.state == "writing":
                raise ValueError(f"request {request_id!r} is being written; forget() it first")
            self._expected[request_id] = _Expected(list(dst_block_ids))

    def wait_received(self, request_id: str, timeout_s: float) -> None:
        """Receiver: block until the request's KV has landed, then stop tracking it.

        Raises TimeoutError after `timeout_s`, KeyError if the id is not expected (never, or forgotten).
        """
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                exp = self._expected.get(request_id)
                if exp is None:
                    raise KeyError(f"request {request_id!r} is not expected by this receiver")
                if exp.state == "landed":
                    del self._expected[request_id]
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f" (last attempt failed: {exp.error})" if exp.error else ""
                    raise TimeoutError(f"KV for {request_id!r} did not arrive within {timeout_s:.3g}s{why}")
                self._cv.wait(left)

    def poll_received(self) -> list[str]:
        """Receiver: ids whose KV has landed since the last poll; each is reported (and untracked) once."""
        with self._cv:
            done = [rid for rid, e in self._expected.items() if e.state == "landed"]
            for rid in done:
                del self._expected[rid]
            return done

    def forget(self, request_id: str) -> None:
        """Receiver: stop expecting `request_id`; later data for it is dropped, never written.

        If a write into its blocks is under way, waits for it to end (bounded by the writer's deadline),
        so the blocks may be reused as soon as this returns.
        """
        with self._cv:
            while True:
                exp = self._expected.get(request_id)
                if exp is None:
                    return
                left = exp.write_deadline - time.monotonic()
                if exp.state != "writing" or left <= 0:
                    del self._expected[request_id]
                    self._cv.notify_all()
                    return
                self._cv.wait(left)

    # --- for implementations ---------------------------------------------------------------------------
    def _claim(self, request_id: str, num_blocks: int, dst_block_ids: list[int] | None,
               max_write_s: float) -> _Expected:
        """Reserve the right to write `request_id`'s blocks; returns the ticket to pass to `_finish`.

        `ticket.dst_block_ids` are the receiver's destination ids (authoritative).
        Raises TransportRejected when the id is not expected, already landed, being written by someone
        else, or the sender's idea of the destination disagrees with the receiver's reservation.
        """
        with self._cv:
            exp = self._expected.get(request_id)
            if exp is None:
                raise TransportRejected(f"receiver does not expect request {request_id!r} (forgotten?)")
            if exp.state != "expected":
                raise TransportRejected(f"request {request_id!r} is already {exp.state} on the receiver")
            if num_blocks != len(exp.dst_block_ids) or (
                    dst_block_ids is not None and list(dst_block_ids) != exp.dst_block_ids):
                raise TransportRejected(
                    f"request {request_id!r}: sender has {num_blocks} blocks for {dst_block_ids}, receiver "
                    f"reserved {exp.dst_block_ids}")
            exp.state = "writing"
            exp.write_deadline = time.monotonic() + max_write_s
            return exp

    def _finish(self, request_id: str, ticket: _Expected, ok: bool, error: str | None = None) -> bool:
        """End a write started by `_claim`: LANDED on success, back to EXPECTED on failure.

        Returns False (and changes nothing) when the claim had lapsed: the request was forgotten after
        the claim's deadline passed (and perhaps re-expected) while the writer was still busy.
        """
        with self._cv:
            current = self._expected.get(request_id) is ticket and ticket.state == "writing"
            if current:
                ticket.state = "landed" if ok else "expected"
                ticket.error = None if ok else error
            self._cv.notify_all()
            return current

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KVSendStream(ABC):
    """One request's KV on its way to a receiver, sent layer by layer while the prefill computes it.

    `layers_ready(src, upto)` runs on the thread that drives the model, right after it enqueued (on its
    current CUDA stream) the work that writes layers [0, upto) of blocks `src`; it only enqueues work and
    never raises (a failure is kept for `finish`). `finish(src)` sends what is left, returns once the
    receiver holds all of it and raises `TransportError` (`TransportRejected`) otherwise. `abort()` ends
    the stream undelivered (the receiver drops what came). Call exactly one of `finish` / `abort`.
    """

    @abstractmethod
    def layers_ready(self, src_block_ids: list[int], upto: int) -> None: ...

    @abstractmethod
    def finish(self, src_block_ids: list[int]) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...


class _BulkSendStream(KVSendStream):
    """For transports without streaming: everything moves in one `send` at `finish`."""

    def __init__(self, transport: KVTransport, endpoint: str, request_id: str, dst: list[int],
                 timeout_s: float) -> None:
        self._transport, self._endpoint, self._rid, self._dst = transport, endpoint, request_id, dst
        self._timeout_s = timeout_s

    def layers_ready(self, src_block_ids: list[int], upto: int) -> None:
        pass

    def finish(self, src_block_ids: list[int]) -> None:
        self._transport.send(self._endpoint, self._rid, src_block_ids, self._dst, self._timeout_s)

    def abort(self) -> None:
        pass


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets: "[::1]:1234")."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise TransportError(f"bad endpoint {endpoint!r}, expected host:port")
    return host.strip("[]"), int(port)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
