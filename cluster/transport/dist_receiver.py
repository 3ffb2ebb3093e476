"""The receiving half of "gloo" and "nccl" (the wire is in `dist_sender`).

Threads: the listener's accept thread; per sender connection, its `PairReceiver.run` on a thread of its own
(pairs, then reads the control messages and posts each chunk's receive with the scatter into the cache right
behind it); on CUDA also the pair's `PairReceiver.answer_ended` thread, which answers each ended transfer as
soon as its data is in. So on CUDA the connection's thread never waits for data, transfers interleave, and a
sender that announces the end with its last chunk gets the answer while its prefill still runs. The blocks
are claimed at KVBegin; a rejected transfer's data is drained.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from cluster.engine.kv_layout import KVLayout
from cluster.kv_trace import NO_TRACE, RECEIVER_FILE, KVTrace, Timeline
from cluster.transport import kv_transfer_pb2 as kpb
from cluster.transport.api import TransportError, TransportRejected, check_cache, first_line
from cluster.transport.control import ControlConn, ControlListener, fine_timer_slack
from cluster.transport.cuda_streams import device_ids, side_stream, wait_event, wait_stream
from cluster.transport.dist_group import PairGroups, host_store, td
from cluster.transport.expectations import Expectations, WriteTicket
from cluster.transport.receiver import Receiver

log = logging.getLogger(__name__)
_PAIR_TIMEOUT_S = 30.0  # for the first message of a new connection
# The sender's dtype sizes a rejected transfer's chunks, which are drained all the same.
_DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8,
                                torch.int8, torch.int16, torch.int32, torch.int64)}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES.update({str(t): t for t in (torch.float8_e4m3fn, torch.float8_e5m2)})


@dataclass
class InTransfer:
    """The receiving side of one transfer on a pair."""

    rid: str
    dtype: torch.dtype
    dst: torch.Tensor  # block ids on the cache's device
    ticket: WriteTicket | None  # None: rejected at KVBegin (its data is drained)
    reason: str
    deadline: float
    timeline: Timeline
    bufs: list[torch.Tensor] = field(default_factory=list)
    ended: bool = False  # KVEnd or KVAbort came: the answer goes out once the data is in
    delivered: bool = False  # it was KVEnd


class DistServer:
    """Hosts the pairs' TCPStore and one `PairReceiver` per sender connection."""

    def __init__(self, backend: str, layout: KVLayout, cache: torch.Tensor, expected: Expectations, host: str,
                 secret: str, trace: KVTrace, recv_grace_s: float) -> None:
        self.backend, self.layout, self.cache, self.expected = backend, layout, cache, expected
        self.host, self.secret, self.trace, self.recv_grace_s = host, secret, trace, recv_grace_s
        self.groups = PairGroups(backend, host, cache.device)
        self.store: dist.TCPStore | None = None
        self._pair_ids = itertools.count(1)
        self._listener: ControlListener | None = None

    def start(self) -> str:
        self.store = host_store(self.host)
        self._listener = ControlListener(self.host, self._serve, name=f"kv-{self.backend}", secret=self.secret)
        return self._listener.endpoint

    def _serve(self, conn: ControlConn) -> None:
        """A new sender's connection, on its own thread: pair, then receive until it ends."""
        msg = conn.recv(_PAIR_TIMEOUT_S)
        store = self.store
        if msg.WhichOneof("kind") != "dist_pair" or store is None:
            return
        pair = next(self._pair_ids)
        conn.send(kpb.KVControl(dist_paired=kpb.DistPaired(pair_id=pair, store_port=int(store.port))))
        PairReceiver(self, conn, pair).run(int(store.port), msg.dist_pair.timeout_s)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()  # closes every connection; their threads end
        self.groups.close()
        self.store = None


class PairReceiver:
    """One sender's connection: its group, its transfers by sequence number, and (CUDA) the stream its
    receives and scatters go on."""

    def __init__(self, server: DistServer, conn: ControlConn, pair: int) -> None:
        self.server, self.conn, self.pair = server, conn, pair
        self.layout, self.cache = server.layout, server.cache
        self.transfers: dict[int, InTransfer] = {}
        self.lock = threading.Lock()
        self.stream = side_stream(self.cache.device) if server.groups.cuda else None
        self.ended: queue.SimpleQueue[tuple[int, InTransfer, torch.cuda.Event] | None] = queue.SimpleQueue()
        self.pg: Any = None

    def run(self, store_port: int, timeout_s: float) -> None:
        """The connection's thread: join the group, then serve control messages until KVBye or a failure."""
        answerer = None
        try:
            self.pg = self.server.groups.join(self.server.host, store_port, self.pair, 1, timeout_s)
            if self.stream is not None:
                answerer = threading.Thread(target=self.answer_ended, name=f"kv-nccl-done{self.pair}", daemon=True)
                answerer.start()
            while True:
                with self.lock:
                    deadline = min((t.deadline for t in self.transfers.values() if not t.ended), default=None)
                try:
                    msg = self.conn.recv(None if deadline is None else max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    raise TransportError("a transfer did not complete in time") from None
                kind = msg.WhichOneof("kind")
                if kind == "bye":
                    return
                if kind == "begin":
                    with self.lock:
                        self.transfers[msg.begin.seq] = self._begin(msg.begin)
                elif kind == "layers":
                    self._receive(self.transfers[msg.layers.seq], msg.layers)
                elif kind in ("end", "abort"):
                    seq = msg.end.seq if kind == "end" else msg.abort.seq
                    self._ended(seq, self.transfers[seq], delivered=kind == "end")
                else:
                    raise TransportError(f"unexpected {kind} message")
        except Exception as e:
            log.warning("KV %s pair %d closed: %s", self.server.backend, self.pair, first_line(e))
        finally:
            if answerer is not None:
                self.ended.put(None)
                answerer.join(10.0)
            self.server.groups.drop(self.pg, wait_s=5.0)
            self._fail_in_flight()

    def _begin(self, msg: kpb.KVBegin) -> InTransfer:
        timeline = self.server.trace.timeline(RECEIVER_FILE, rid=msg.request_id, transport=self.server.backend)
        timeline.mark("begin")
        rid, dst = msg.request_id, list(msg.dst_block_ids)
        dtype = _DTYPES.get(msg.dtype)
        if dtype is None:  # cannot even size its chunks
            raise TransportError(f"unsupported dtype {msg.dtype!r}; cannot stay in sync")
        lay = self.layout
        deadline = time.monotonic() + msg.timeout_s + self.server.recv_grace_s
        ticket, reason = None, ""
        try:
            if dtype != lay.dtype or list(msg.block_shape) != [lay.block_size, lay.num_kv_heads, lay.head_dim]:
                raise TransportRejected(f"layout mismatch: sender {msg.dtype} blocks {list(msg.block_shape)}, "
                                        f"receiver {lay}")
            ticket = self.server.expected.claim(rid, len(dst), dst, deadline - time.monotonic())
        except TransportRejected as e:
            reason = str(e)
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            idx = device_ids(dst, self.cache.device)  # ordered before this pair's scatters
        return InTransfer(rid, dtype, idx, ticket, reason, deadline, timeline)

    def _receive(self, t: InTransfer, msg: kpb.KVLayers) -> None:
        lo, hi, numel = msg.lo, msg.hi, msg.numel
        shape = (hi - lo, 2, len(t.dst), *self.cache.shape[3:])
        if self.stream is None:  # gloo: on the CPU, synchronously
            buf = torch.empty(numel, dtype=t.dtype)
            self.pg.recv([buf], 0, 0).wait(td(t.deadline - time.monotonic()))
            if t.ticket is not None:
                self.layout.scatter(self.cache, t.dst, buf.view(shape), (lo, hi))
            t.timeline.mark("posted")
            t.timeline.mark("data")
            return
        started = time.monotonic()
        with torch.cuda.stream(self.stream):
            buf = torch.empty(numel, dtype=t.dtype, device=self.cache.device)
            self.pg.recv([buf], 0, 0).wait()  # the stream waits for the data; this thread does not
            if t.ticket is not None:
                self.layout.scatter(self.cache, t.dst, buf.view(shape), (lo, hi))
        t.bufs.append(buf)
        t.timeline.mark("posted")  # the last chunk's receive and scatter are enqueued
        t.timeline.add("post_s", time.monotonic() - started)  # this thread's time on the chunks

    def _ended(self, seq: int, t: InTransfer, delivered: bool) -> None:
        t.ended, t.delivered = True, delivered
        t.timeline.mark("end")
        if self.stream is None:
            reply = self._answer(seq, t)
            with self.lock:
                del self.transfers[seq]
            self.conn.send(reply)
            return
        event = torch.cuda.Event()
        event.record(self.stream)
        self.ended.put((seq, t, event))

    def answer_ended(self) -> None:
        """The pair's answering thread (CUDA): answer ended transfers, in order, as their data lands; past a
        deadline, break the pair."""
        fine_timer_slack()  # its polls of the data's event end on time
        while (item := self.ended.get()) is not None:
            seq, t, event = item
            try:
                wait_event(event, t.deadline)
            except TransportError:
                log.warning("KV nccl transfer of %r did not complete in time", t.rid)
                self.conn.close()  # the connection's thread sees it and drops the pair
                return
            t.timeline.mark("data")
            reply = self._answer(seq, t)
            with self.lock:
                self.transfers.pop(seq, None)
            try:
                self.conn.send(reply)
            except TransportError:
                return

    def _answer(self, seq: int, t: InTransfer) -> kpb.KVControl:
        """The answer to an ended transfer whose data is in (scattered): finish its claim."""
        t.bufs.clear()
        t.timeline.mark("reply")
        if t.ticket is None:
            status, error = kpb.KVReply.REJECTED, t.reason
        elif not t.delivered:
            self.server.expected.finish(t.rid, t.ticket, False, "the sender aborted the transfer")
            status, error = kpb.KVReply.ABORTED, ""
        elif self.server.expected.finish(t.rid, t.ticket, True):
            status, error = kpb.KVReply.OK, ""
            t.timeline.done()
        else:
            status, error = kpb.KVReply.LATE, "the claim lapsed before the data arrived"
        return kpb.KVControl(reply=kpb.KVReply(seq=seq, status=status, error=error))

    def _fail_in_flight(self) -> None:
        """After a broken pair: claimed transfers go back to EXPECTED once no scatter can still run (a cut-off
        receive may have scattered garbage into their own blocks, never into others'); if the stream does not
        drain, their claims lapse at their deadlines (forget() waits that long)."""
        claimed = [t for t in self.transfers.values() if t.ticket is not None]
        if not claimed:
            return
        if self.stream is not None:
            try:
                wait_stream(self.stream, time.monotonic() + 5.0)
            except TransportError:
                return
        for t in claimed:
            assert t.ticket is not None
            self.server.expected.finish(t.rid, t.ticket, False, "the sender's connection broke mid-transfer")


def open_receiver(layout: KVLayout, cache: torch.Tensor, *, backend: str, host: str = "127.0.0.1",
                  secret: str = "", trace: KVTrace = NO_TRACE, recv_grace_s: float = 5.0) -> Receiver:
    """`recv_grace_s`: past a transfer's announced timeout, how long its pair waits before giving up on it."""
    check_cache(layout, cache)
    if backend == "nccl" and cache.device.type != "cuda":
        raise ValueError("the nccl transport needs a CUDA KV cache")
    expected = Expectations()
    return Receiver(backend, DistServer(backend, layout, cache, expected, host, secret, trace, recv_grace_s),
                    expected)
