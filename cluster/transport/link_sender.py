"""The `KVSender` of the socket-controlled transports ("nccl"/"gloo", "cuda_ipc"): a `Route` per receiver
endpoint, each handoff a `SendStream` whose data a transport's `Mover` moves.

Which thread runs what, per handoff:
  the caller (a prefill worker's blocking pool)  `open_send`: connect and pair if the route has no link;
  the model's thread, inside the forward          `layers_ready`: announce the transfer, enqueue each chunk;
  the caller again, after the forward             `finish`: enqueue what is left, wait for the answer;
  any thread                                      `abort`: tell the receiver to drop what came.
Announcing and enqueueing hold the route's lock (so control messages and data keep one order on the link);
waiting for the receiver never does, and never happens on the model's thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.engine.kv_layout import KVLayout
from cluster.kv_trace import NO_TRACE, SENDER_FILE, KVTrace, Timeline
from cluster.transport.api import (
    KVSendStream,
    TransportError,
    TransportRejected,
    check_cache,
    first_line,
    time_left,
)
from cluster.transport.link import Link, Route

CHUNK_BYTES = 32 << 20  # streaming granularity: big enough for link speed, small enough to follow the layers
BULK_CHUNKS = 4  # layers all ready at once (a plain send) go in chunks of BULK_CHUNKS * chunk_bytes


@dataclass(frozen=True)
class Chunking:
    """How a transport cuts a handoff into chunks of layers. `streams`: layers go out during the forward
    (False: the data moves synchronously, so all of it at `finish`); `whole_bulk`: a plain send moves every
    layer in one piece (worth it where one piece has no pipeline to fill); `max_stream_chunks`: at most this
    many chunks per streamed transfer (None: `chunk_bytes` decides)."""

    streams: bool = True
    chunk_bytes: int = CHUNK_BYTES
    whole_bulk: bool = False
    max_stream_chunks: int | None = None

    def layers(self, layout: KVLayout, num_blocks: int) -> tuple[int, int]:
        """(layers per streamed chunk, layers per chunk of a plain send) for a transfer of `num_blocks`."""
        per_layer = max(layout.bytes_per_layer(num_blocks), 1)
        fewest = -(-layout.num_layers // self.max_stream_chunks) if self.max_stream_chunks else 1
        streamed = max(1, self.chunk_bytes // per_layer, fewest)
        bulk = layout.num_layers if self.whole_bulk else max(1, BULK_CHUNKS * self.chunk_bytes // per_layer)
        return streamed, bulk


class Transfer(Protocol):
    """One request's data path on a link (a mover makes one per handoff). `begin`, `move` and `end` run under
    the route's lock; `complete` and `abort` wait for the receiver, outside it."""

    def begin(self, src: list[int], deadline: float) -> None:
        """Announce the transfer of blocks `src` to the receiver (before any layer)."""

    def move(self, src: list[int], lo: int, hi: int, streaming: bool) -> None:
        """Enqueue layers [lo, hi) of blocks `src` (never called for an empty transfer); `streaming`: beside a
        running prefill."""

    def end(self) -> None:
        """Every layer is enqueued: tell the receiver (with the last chunk, so the answer can come while the
        prefill ends). An abort is too late after this."""

    def complete(self, deadline: float) -> None:
        """Wait until the receiver holds the data; raise TransportError (TransportRejected) if it does not."""

    def abort(self, send_ordered: Callable[[Any], None], deadline: float) -> None:
        """Tell the receiver to drop what came (`send_ordered(message)` sends under the route's lock) and wait
        for its answer until `deadline` (only called once the transfer was announced and before `end`)."""


class Mover(Protocol):
    """One transport's sending half: how it pairs with a receiver and what moves a handoff's data."""

    name: str
    chunking: Chunking

    def connect(self, endpoint: str, deadline: float) -> Link[Any]:
        """A new, paired link to the receiver at `endpoint`, by `deadline`."""

    def transfer(self, link: Link[Any], seq: int, request_id: str, dst: list[int], timeline: Timeline) -> Transfer:
        """The data path of handoff `seq` on `link`, into the receiver's blocks `dst`."""

    def close_link(self, link: Link[Any], polite: bool) -> None:
        """Release the link's pairing state; `polite` (a clean close) may tell the receiver first."""

    def close(self) -> None:
        """After every link is closed: release what the mover still holds."""


class SendStream(KVSendStream):
    """One handoff over a link: layers into chunks, in order, then the answer (see the module for threads)."""

    def __init__(self, route: Route[Any], link: Link[Any], transfer: Transfer, rid: str, dst: list[int],
                 timeout_s: float, layout: KVLayout, chunking: Chunking, timeline: Timeline) -> None:
        self.route, self.link, self.transfer, self.rid, self.dst = route, link, transfer, rid, dst
        self.layout, self.timeout_s, self.streams, self.timeline = layout, timeout_s, chunking.streams, timeline
        self.chunk_layers, self.bulk_layers = chunking.layers(layout, len(dst))
        self.deadline: float | None = None  # starts with the first layers: a prefill may queue before
        self.sent = 0  # layers enqueued so far
        self.started = False  # the receiver was told (begin)
        self.ended = False  # the receiver was told that every layer is out (end): abort is then too late
        self.streaming = False  # the current chunks go out beside a running prefill
        self.error: BaseException | None = None
        self.done = False  # finish() or abort() was called
        self._state = threading.Lock()  # orders layers_ready against abort/finish from other threads

    def _ordered(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn` under the route's lock, on a link that still works."""
        assert self.deadline is not None
        if not self.route.lock.acquire(timeout=time_left(self.deadline)):
            raise TransportError("timed out waiting for other sends on this link")
        try:
            if self.link.broken:
                raise TransportError(self.link.broken)
            fn(*args)
        finally:
            self.route.lock.release()

    def _advance(self, src: list[int], upto: int, final: bool) -> None:
        if len(src) != len(self.dst):
            raise TransportRejected(f"{len(src)} source blocks but {len(self.dst)} destinations")
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
            self.timeline.mark("first")
        if not self.started:
            self._ordered(self.transfer.begin, src, self.deadline)
            self.started = True
        if not self.dst:
            self.sent = upto
        self.streaming = not (final and self.sent == 0)  # else everything goes at once, as fast as it can
        step = self.chunk_layers if self.streaming else self.bulk_layers
        while self.sent < upto and (final or upto - self.sent >= step):
            hi = min(self.sent + step, upto)
            self._ordered(self.transfer.move, src, self.sent, hi, self.streaming)
            self.sent = hi
        if self.sent == self.layout.num_layers and not self.ended:
            self.timeline.mark("all_sent")
            self._ordered(self.transfer.end)
            self.ended = True

    def _fail(self, e: BaseException) -> BaseException:
        """Drop the link unless the receiver merely rejected; return the error for the caller."""
        if isinstance(e, TransportRejected):
            return e
        self.route.drop(self.link, f"{type(e).__name__}: {e}")
        if isinstance(e, TransportError):
            return e
        return TransportError(f"KV send of {self.rid!r} to {self.route.endpoint} failed: {first_line(e)}")

    def layers_ready(self, src_block_ids: list[int], upto: int) -> None:
        with self._state:  # an abort() from another thread waits for this chunk, then nothing follows it
            if self.error is not None or self.done or not self.streams:
                return
            try:
                self._advance(src_block_ids, upto, final=upto >= self.layout.num_layers)
            except BaseException as e:  # kept for finish(): the model thread must not fail
                self.error = self._fail(e)

    def finish(self, src_block_ids: list[int]) -> None:
        with self._state:
            if self.done:
                raise RuntimeError("finish() or abort() was already called")
            self.done = True
        if self.error is not None:
            raise self.error
        self.timeline.mark("finish")
        try:
            self._advance(src_block_ids, self.layout.num_layers, final=True)
            assert self.deadline is not None
            self.transfer.complete(self.deadline)
        except BaseException as e:
            raise self._fail(e) from e
        self.timeline.mark("reply")
        self.timeline.done(streamed=self.streaming)

    def abort(self) -> None:
        with self._state:
            if self.done:
                return
            self.done = True
            tell = self.started and not self.ended and self.error is None
        if tell:  # outside the lock: a model thread calling layers_ready must never wait for the receiver
            try:
                self.transfer.abort(lambda msg: self._ordered(self.link.ctl.send, msg),
                                    time.monotonic() + min(self.timeout_s, 5.0))
            except BaseException as e:
                self._fail(e)


class LinkSender:
    """A prefill worker's end of "nccl"/"gloo" or "cuda_ipc" (see `api.KVSender`)."""

    def __init__(self, mover: Mover, layout: KVLayout, cache: Any, trace: KVTrace = NO_TRACE) -> None:
        check_cache(layout, cache)
        self.name = mover.name
        self.layout = layout
        self._mover = mover
        self._trace = trace
        self._lock = threading.Lock()
        self._routes: dict[str, Route[Any]] = {}
        self._closed = False

    def open_send(self, endpoint: str, request_id: str, dst_block_ids: list[int], timeout_s: float) -> SendStream:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            route = self._routes.setdefault(endpoint, Route(endpoint, self._mover.close_link))
        if not route.lock.acquire(timeout=max(timeout_s, 0.0)):
            raise TransportError(f"timed out after {timeout_s:.3g}s waiting for other sends to {endpoint}")
        try:
            if route.link is None:
                try:
                    route.link = self._mover.connect(endpoint, deadline)
                except TransportError:
                    raise
                except Exception as e:
                    raise TransportError(f"KV receiver {endpoint}: connecting failed: {first_line(e)}") from e
            link = route.link
            link.seq += 1
            seq = link.seq
        finally:
            route.lock.release()
        dst = list(dst_block_ids)
        timeline = self._trace.timeline(SENDER_FILE, rid=request_id, transport=self.name, blocks=len(dst))
        transfer = self._mover.transfer(link, seq, request_id, dst, timeline)
        return SendStream(route, link, transfer, request_id, dst, timeout_s, self.layout, self._mover.chunking,
                          timeline)

    def send(self, endpoint: str, request_id: str, src_block_ids: list[int], dst_block_ids: list[int],
             timeout_s: float) -> None:
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destinations")
        self.open_send(endpoint, request_id, dst_block_ids, timeout_s).finish(src_block_ids)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            routes = list(self._routes.values())
        for route in routes:
            route.close()
        self._mover.close()
