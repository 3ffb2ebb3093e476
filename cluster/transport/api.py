"""The KV transport's two ends, as the roles see them: a prefill worker holds a `KVSender`, a decode worker a
`KVReceiver`. A handoff moves one request's KV blocks from the sender's paged cache into blocks the receiver
has reserved.

The receiver announces each reservation with `expect()` *before* the sender is told the destination ids;
anything that arrives for an id it does not expect (never announced, forgotten, or already landed) is dropped
and the sender's send raises `TransportRejected`. The receiver's view is authoritative: a send that raised a
plain `TransportError` (a timeout, a lost reply) may still have landed; a retry of the same request then gets
`TransportRejected` ("already landed").
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from cluster.engine.kv_layout import KVLayout


class TransportError(RuntimeError):
    """A send failed: receiver unreachable or dead, timeout, or the receiver rejected the data."""


class TransportRejected(TransportError):
    """The receiver is alive but dropped the data (request not expected, forgotten, or mismatched)."""


class KVSendStream(Protocol):
    """One request's KV on its way to a receiver, sent layer by layer while the prefill computes it.

    Call exactly one of `finish` / `abort`.
    """

    def layers_ready(self, src_block_ids: list[int], upto: int) -> None:
        """On the thread that drives the model, right after it enqueued (on its current CUDA stream) the work
        that writes layers [0, upto) of blocks `src`: only enqueues work, never raises (a failure is kept for
        `finish`), never waits for the receiver."""

    def finish(self, src_block_ids: list[int]) -> None:
        """Send what is left; return once the receiver holds all of it, else raise `TransportError`."""

    def abort(self) -> None:
        """End the stream undelivered (the receiver drops what came)."""


class KVSender(Protocol):
    """A prefill worker's end: pushes KV into receivers' reservations. Thread-safe; sends to one or several
    endpoints may run at once."""

    name: str

    def open_send(self, endpoint: str, request_id: str, dst_block_ids: list[int], timeout_s: float) -> KVSendStream:
        """Start a handoff whose layers go out as the prefill produces them. Connects to the receiver if needed
        (may block up to `timeout_s`); sends nothing yet. A transport that cannot stream sends it all at
        `finish`."""

    def send(self, endpoint: str, request_id: str, src_block_ids: list[int], dst_block_ids: list[int],
             timeout_s: float) -> None:
        """Copy `cache[:, :, src]` into the receiver's `cache[:, :, dst]`; return once the receiver holds it.
        Raises `TransportError` (never hangs past `timeout_s`, give or take connection set-up)."""

    def close(self) -> None:
        """Drop every connection; the cache is left alone."""


class KVReceiver(Protocol):
    """A decode worker's end: `listen` once, then per request `expect` -> `wait_received` (or `poll_received`)
    / `forget`. Thread-safe."""

    name: str

    def listen(self) -> str:
        """Start accepting senders (idempotent); return the endpoint to publish."""

    def expect(self, request_id: str, dst_block_ids: list[int]) -> None:
        """Announce that `request_id`'s KV will land in `dst_block_ids` (reserved by the caller)."""

    def wait_received(self, request_id: str, timeout_s: float) -> None:
        """Block until the request's KV has landed, then stop tracking it. TimeoutError after `timeout_s`,
        KeyError if it is not expected (never, or forgotten)."""

    def poll_received(self) -> list[str]:
        """Ids whose KV has landed since the last poll; each is reported (and untracked) once."""

    def forget(self, request_id: str) -> None:
        """Stop expecting `request_id`; later data for it is dropped. Waits out a write in progress, so its
        blocks may be reused as soon as this returns."""

    def close(self) -> None:
        """Stop accepting and end every connection; the cache is left alone."""


def check_cache(layout: KVLayout, cache: torch.Tensor) -> None:
    """ValueError unless `cache` is a whole, contiguous paged cache of `layout`."""
    if cache.dim() != 6 or tuple(cache.shape) != layout.cache_shape(cache.shape[2]) or cache.dtype != layout.dtype:
        raise ValueError(f"cache {tuple(cache.shape)}/{cache.dtype} does not match layout {layout}")
    if not cache.is_contiguous():
        raise ValueError("the KV cache must be contiguous")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets: "[::1]:1234")."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise TransportError(f"bad endpoint {endpoint!r}, expected host:port")
    return host.strip("[]"), int(port)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def time_left(deadline: float) -> float:
    """Seconds until `deadline` (monotonic); TransportError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransportError("KV send timed out")
    return left


def first_line(e: BaseException) -> str:
    """An exception in one line (NCCL's and gloo's messages run over many)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
