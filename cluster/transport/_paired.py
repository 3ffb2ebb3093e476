"""Sender side shared by the socket-controlled transports ("gloo"/"nccl", "cuda_ipc").

A sender keeps one `OutPair` per receiver endpoint. The pair's `Link` is one live connection (control
socket plus transport state: a process group, a mapped peer cache); any failure other than a rejection
drops the link as a whole and the next send connects afresh. Several handoffs may be under way on one
link at once (a prefill batch streams many requests layer by layer): each has its own sequence number,
and `OutPair.lock` keeps every control message and the data that follows it in one order on both sides.

A handoff is a `PairedSendStream`: layers go out in chunks of about `CHUNK_BYTES` as they become ready
(`layers_ready`), or all at `finish`; `send()` is `open_send(...).finish(src)`.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from typing import Any, ClassVar

import torch

from cluster.engine.kv_layout import KVLayout
from cluster.kv_trace import record
from cluster.transport._link import Link, OutPair
from cluster.transport._sock_ctl import CtlConn, CtlListener
from cluster.transport.base import KVSendStream, KVTransport, TransportError, TransportRejected

CHUNK_BYTES = 32 << 20  # streaming granularity: big enough for link speed, small enough to follow the layers
BULK_CHUNKS = 4  # layers all ready at once (a plain send) go in chunks of BULK_CHUNKS * chunk_bytes


class PairedSendStream(KVSendStream):
    """A handoff over a `Link`: subclasses move the chunks (`_send_layers`) and end the transfer (`_complete`)."""

    def __init__(self, transport: PairedTransport, pair: OutPair, link: Link, seq: int, rid: str, dst: list[int],
                 timeout_s: float) -> None:
        self.t, self.pair, self.link, self.seq, self.rid, self.dst = transport, pair, link, seq, rid, dst
        self.layout: KVLayout = transport.layout
        self.timeout_s = timeout_s
        self.deadline: float | None = None  # starts with the first layers: a prefill may queue before
        self.sent = 0  # layers sent so far
        self.started = False
        self.error: BaseException | None = None
        self.done = False
        per_layer = max(self.layout.bytes_per_layer(len(dst)), 1)
        fewest = -(-self.layout.num_layers // transport.max_stream_chunks) if transport.max_stream_chunks else 1
        self.chunk_layers = max(1, transport.chunk_bytes // per_layer, fewest)
        bulk = BULK_CHUNKS * transport.chunk_bytes // per_layer
        self.bulk_layers = self.layout.num_layers if transport.whole_bulk else max(1, bulk)
        self.ended = False  # the receiver was told that every layer is out (see _all_sent)
        self.streaming = False  # the current chunks go out beside a running prefill
        self.times: dict[str, float] = {}  # monotonic: "first" layers, "all_sent", "finish" (see trace)
        self._state = threading.Lock()  # orders layers_ready against abort/finish from other threads

    def left(self) -> float:
        assert self.deadline is not None
        return self.t._left(self.deadline)

    @abstractmethod
    def _begin(self, src: list[int]) -> None:
        """Announce the transfer of blocks `src` to the receiver (before any layer). Caller holds pair.lock."""

    @abstractmethod
    def _send_layers(self, src: list[int], lo: int, hi: int) -> None:
        """Move layers [lo, hi) of blocks `src` (never called for an empty transfer). Caller holds pair.lock."""

    @abstractmethod
    def _complete(self) -> dict[str, Any]:
        """All layers are out: wait until the receiver holds them; raise if it does not. Returns its reply."""

    @abstractmethod
    def _abort(self) -> None:
        """Tell the receiver to drop what came (only called once the transfer was announced)."""

    def _locked(self, fn: Any, *args: Any) -> None:
        if not self.pair.lock.acquire(timeout=self.left()):
            raise TransportError("timed out waiting for other sends on this link")
        try:
            if self.link.broken:
                raise TransportError(self.link.broken)
            fn(*args)
        finally:
            self.pair.lock.release()

    def _advance(self, src: list[int], upto: int, final: bool) -> None:
        if len(src) != len(self.dst):
            raise TransportRejected(f"{len(src)} source blocks but {len(self.dst)} destinations")
        if self.deadline is None:
            self.times["first"] = time.monotonic()
            self.deadline = self.times["first"] + self.timeout_s
        if not self.started:
            self._locked(self._begin, src)
            self.started = True
        if not self.dst:
            self.sent = upto
        self.streaming = not (final and self.sent == 0)  # else everything goes at once, as fast as it can
        step = self.chunk_layers if self.streaming else self.bulk_layers
        while self.sent < upto and (final or upto - self.sent >= step):
            hi = min(self.sent + step, upto)
            self._locked(self._send_layers, src, self.sent, hi)
            self.sent = hi
        if self.sent == self.layout.num_layers and not self.ended:
            self.times["all_sent"] = time.monotonic()
            self._locked(self._all_sent)  # with the last chunk: the answer can come while the prefill ends

    def _all_sent(self) -> None:
        """Every layer is out (enqueued). A receiver that can then finish on its own is told here (set
        `ended`: abort is then too late). Caller holds pair.lock."""

    def _fail(self, e: BaseException) -> BaseException:
        """Drop the link unless the receiver merely rejected; return the error for the caller."""
        if isinstance(e, TransportRejected):
            return e
        self.t._drop(self.pair, self.link, f"{type(e).__name__}: {e}")
        if isinstance(e, TransportError):
            return e
        return TransportError(f"KV send of {self.rid!r} to {self.pair.endpoint} failed: {self.t._describe(e)}")

    def layers_ready(self, src_block_ids: list[int], upto: int) -> None:
        with self._state:  # an abort() from another thread waits for this chunk, then nothing follows it
            if self.error is not None or self.done or not self.t.streams_layers:
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
        self.times["finish"] = time.monotonic()
        try:
            self._advance(src_block_ids, self.layout.num_layers, final=True)
            reply = self._complete()
        except BaseException as e:
            raise self._fail(e) from e
        record({"rid": self.rid, "transport": self.t.name, "blocks": len(self.dst), "streamed": self.streaming,
                **self.times, "reply": time.monotonic(), "rx": reply.get("rx")})

    def abort(self) -> None:
        with self._state:
            if self.done:
                return
            self.done = True
            tell = self.started and not self.ended and self.error is None
        if tell:  # outside the lock: a model thread calling layers_ready must never wait for the receiver
            try:
                self._abort()
            except BaseException as e:
                self._fail(e)


class PairedTransport(KVTransport):
    """A transport whose sender runs its handoffs over one `Link` per receiver endpoint."""

    _stream_type: ClassVar[type[PairedSendStream]]
    streams_layers: ClassVar[bool] = True  # False: the data moves synchronously, so all of it at finish()
    # Copies and NCCL kernels go on high-priority streams: they use few SMs but must not queue behind a
    # prefill's (or a decode step's) kernels, or the transfer lags the compute it should hide behind.
    high_priority: ClassVar[bool] = True
    # True: a plain send moves every layer in one piece. Worth it where one piece has no pipeline to fill
    # (cuda_ipc: one copy straight into the peer), not where a gather, a send and a scatter overlap (nccl).
    whole_bulk: ClassVar[bool] = False
    # At most this many chunks per streamed transfer (None: chunk_bytes decides), for receivers that post
    # each chunk from Python (nccl/gloo: a receive and a scatter, each waiting for the GIL under load).
    max_stream_chunks: ClassVar[int | None] = None

    def side_stream(self) -> torch.cuda.Stream:
        """A stream of our own for copies, at high priority (see `high_priority`)."""
        return torch.cuda.Stream(self.cache.device, priority=-1 if self.high_priority else 0)

    def __init__(self, layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1",
                 chunk_bytes: int = CHUNK_BYTES, secret: str = "") -> None:
        super().__init__(layout, cache, host=host, secret=secret)
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._out: dict[str, OutPair] = {}
        self._closed = False
        self._listener: CtlListener | None = None

    # --- receiver -----------------------------------------------------------------------------------
    def listen(self) -> str:
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            if self._listener is None:
                self._prepare_listen()
                self._listener = CtlListener(self.host, self._serve_pair, name=f"kv-{self.name}",
                                             secret=self.secret)
            return self._listener.endpoint

    def _prepare_listen(self) -> None:
        """What the receiver sets up once, before it accepts connections."""

    @abstractmethod
    def _serve_pair(self, conn: CtlConn) -> None:
        """Serve one sender's control connection (on its own thread) until it ends."""

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
        self._close_pairs()
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()  # closes every connection; their threads end
        self._after_close()

    def _after_close(self) -> None:
        """Anything to release once links and listener are gone."""

    # --- sender -------------------------------------------------------------------------------------
    @abstractmethod
    def _connect(self, endpoint: str, deadline: float) -> Link:
        """A new, paired link to the receiver at `endpoint`, by `deadline`."""

    def _close_link(self, link: Link, polite: bool) -> None:
        """Release the link's transport state; `polite` (clean close) may tell the receiver first."""
        link.ctl.close()

    def _describe(self, e: BaseException) -> str:
        """How an unexpected failure is worded in the TransportError that replaces it."""
        return str(e)

    def _drop(self, pair: OutPair, link: Link, why: str) -> None:
        """Forget a broken link; streams still on it fail, the next send connects afresh."""
        if pair.link is link:
            pair.link = None
        if link.broken is None:
            link.mark_broken(why)
            self._close_link(link, polite=False)

    def open_send(self, endpoint: str, request_id: str, dst_block_ids: list[int], timeout_s: float) -> KVSendStream:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            pair = self._out.setdefault(endpoint, OutPair(endpoint))
        if not pair.lock.acquire(timeout=max(timeout_s, 0.0)):
            raise TransportError(f"timed out after {timeout_s:.3g}s waiting for other sends to {endpoint}")
        try:
            if pair.link is None:
                try:
                    pair.link = self._connect(endpoint, deadline)
                except TransportError:
                    raise
                except Exception as e:
                    raise TransportError(f"KV receiver {endpoint}: connecting failed: {self._describe(e)}") from e
            link = pair.link
            link.seq += 1
            seq = link.seq
        finally:
            pair.lock.release()
        return self._stream_type(self, pair, link, seq, request_id, list(dst_block_ids), timeout_s)

    def send(self, endpoint: str, request_id: str, src_block_ids: list[int], dst_block_ids: list[int],
             timeout_s: float) -> None:
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destinations")
        self.open_send(endpoint, request_id, dst_block_ids, timeout_s).finish(src_block_ids)

    @staticmethod
    def _left(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportError("KV send timed out")
        return left

    def _close_pairs(self) -> None:
        """On close: drop every link, politely, waiting at most 5 s for a message in progress on it."""
        with self._lock:
            self._closed = True
            pairs = list(self._out.values())
        for pair in pairs:
            locked = pair.lock.acquire(timeout=5.0)
            try:
                link, pair.link = pair.link, None
                if link is not None and link.broken is None:
                    self._close_link(link, polite=locked)
                    link.mark_broken("transport closed")
            finally:
                if locked:
                    pair.lock.release()
