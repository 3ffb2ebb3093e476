"""The receiving side of the "gloo"/"nccl" transports (see `torch_dist` for the wire protocol).

Each sender's connection is served on a thread of its own: it pairs, builds the pair's process group,
then posts every announced chunk's receive on a stream of its own with the scatter into the cache right
behind it (GPU-side: no CPU wait). On CUDA an ended transfer goes to the pair's completer thread, which
answers as soon as its data is in, so this thread never waits for data and transfers can interleave.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from cluster.engine.kv_layout import KVLayout
from cluster.transport._sock_ctl import CtlConn, fine_timer_slack
from cluster.transport._streams import device_ids, wait_event, wait_stream
from cluster.transport.base import TransportError, TransportRejected, _Expected

log = logging.getLogger(__name__)

DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8,
                               torch.int8, torch.int16, torch.int32, torch.int64)}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.update({str(t): t for t in (torch.float8_e4m3fn, torch.float8_e5m2)})


def td(seconds: float) -> timedelta:
    return timedelta(seconds=max(seconds, 0.001))


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


@dataclass
class _InTransfer:
    """Receiver side of one transfer on a pair."""

    rid: str
    dtype: torch.dtype
    dst: torch.Tensor  # block ids on the cache's device
    ticket: _Expected | None  # None: rejected at "begin" (its data is drained)
    reason: str
    deadline: float
    bufs: list[torch.Tensor] = field(default_factory=list)
    ended: bool = False  # "end" or "abort" came: the completer answers once the data is in
    delivered: bool = False  # it was "end"
    rx: dict[str, float] = field(default_factory=dict)  # monotonic times, sent back in the reply (trace)


class DistReceiver:
    """Mixin of `_TorchDistTransport`: everything a receiver does once `listen()` has started the listener.

    The transport provides the attributes below and `side_stream`, `_join`, `_drop_pg`, `_claim`, `_finish`.
    """

    layout: KVLayout
    cache: torch.Tensor
    host: str
    backend: str
    _store: Any  # the TCPStore the pairs' process groups meet on
    _pair_ids: Any  # itertools.count
    _cuda: bool
    _recv_grace_s: float

    def _serve_pair(self, conn: CtlConn) -> None:
        """One sender's connection, on its own thread: pair, then receive transfers until it ends.

        On CUDA nothing here waits for data: chunks are posted on `stream`, and a transfer that ended is
        handed to a completer thread that answers as soon as its data is in (so a sender that announces
        the end with its last chunk gets the answer while its prefill still runs).
        """
        msg = conn.recv(30.0)
        store = self._store
        if msg.get("op") != "pair" or store is None:
            return
        pair, timeout_s = next(self._pair_ids), float(msg["timeout"])
        conn.send({"pair": pair, "store_port": int(store.port)})
        pg, transfers, lock = None, {}, threading.Lock()
        stream = self.side_stream() if self._cuda else None
        ended: queue.SimpleQueue[tuple[int, _InTransfer, torch.cuda.Event] | None] = queue.SimpleQueue()
        completer = None
        try:
            pg = self._join(self.host, int(store.port), pair, 1, timeout_s)
            if stream is not None:
                completer = threading.Thread(target=self._completer, args=(conn, ended, transfers, lock),
                                             name=f"kv-nccl-done{pair}", daemon=True)
                completer.start()
            while True:
                with lock:
                    deadline = min((t.deadline for t in transfers.values() if not t.ended), default=None)
                try:
                    msg = conn.recv(None if deadline is None else max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    raise TransportError("a transfer did not complete in time") from None
                op, seq = msg["op"], int(msg.get("seq", 0))
                if op == "bye":
                    return
                if op == "begin":
                    with lock:
                        transfers[seq] = self._begin_in(msg, stream)
                elif op == "chunk":
                    self._recv_chunk(pg, stream, transfers[seq], msg)
                elif op in ("end", "abort"):
                    t = transfers[seq]
                    t.ended, t.delivered = True, op == "end"
                    t.rx["end"] = time.monotonic()
                    if stream is None:
                        reply = self._end_in(t)
                        with lock:
                            del transfers[seq]
                        conn.send({"seq": seq, **reply})
                    else:
                        event = torch.cuda.Event()
                        event.record(stream)
                        ended.put((seq, t, event))
        except Exception as e:
            log.warning("KV %s pair %d closed: %s", self.backend, pair, first_line(e))
        finally:
            if completer is not None:
                ended.put(None)
                completer.join(10.0)
            self._drop_pg(pg, wait_s=5.0)
            self._fail_in_flight(stream, transfers)

    def _completer(self, conn: CtlConn, ended: queue.SimpleQueue, transfers: dict[int, _InTransfer],
                   lock: threading.Lock) -> None:
        """Answer ended transfers, in order, as their data lands; past a deadline, break the pair."""
        fine_timer_slack()  # its polls of the data's event end on time
        while (item := ended.get()) is not None:
            seq, t, event = item
            try:
                wait_event(event, t.deadline)
            except TransportError:
                log.warning("KV nccl transfer of %r did not complete in time", t.rid)
                conn.close()  # the pair's thread sees it and drops the pair
                return
            t.rx["data"] = time.monotonic()
            reply = self._end_in(t)
            with lock:
                transfers.pop(seq, None)
            try:
                conn.send({"seq": seq, **reply})
            except TransportError:
                return

    def _fail_in_flight(self, stream: torch.cuda.Stream | None, transfers: dict[int, _InTransfer]) -> None:
        """After a broken pair: claimed transfers go back to EXPECTED once no scatter can still run (a
        cut-off receive may have scattered garbage into their own blocks, never into others'); if the
        stream does not drain, their claims lapse at their deadlines (forget() waits that long)."""
        claimed = [t for t in transfers.values() if t.ticket is not None]
        if not claimed:
            return
        if stream is not None:
            try:
                wait_stream(stream, time.monotonic() + 5.0)
            except TransportError:
                return
        for t in claimed:
            assert t.ticket is not None
            self._finish(t.rid, t.ticket, False, "the sender's connection broke mid-transfer")

    def _begin_in(self, msg: dict[str, Any], stream: torch.cuda.Stream | None) -> _InTransfer:
        seen = time.monotonic()
        rid, dst = str(msg["rid"]), [int(b) for b in msg["dst"]]
        dtype = DTYPES.get(msg["dtype"])
        if dtype is None:  # cannot even size its chunks
            raise TransportError(f"unsupported dtype {msg['dtype']!r}; cannot stay in sync")
        lay = self.layout
        deadline = time.monotonic() + float(msg["timeout"]) + self._recv_grace_s
        ticket, reason = None, ""
        try:
            if dtype != lay.dtype or list(msg["block"]) != [lay.block_size, lay.num_kv_heads, lay.head_dim]:
                raise TransportRejected(f"layout mismatch: sender {msg['dtype']} blocks {msg['block']}, receiver {lay}")
            ticket = self._claim(rid, len(dst), dst, deadline - time.monotonic())
        except TransportRejected as e:
            reason = str(e)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            idx = device_ids(dst, self.cache.device)  # ordered before this pair's scatters
        return _InTransfer(rid, dtype, idx, ticket, reason, deadline, rx={"begin": seen})

    def _recv_chunk(self, pg: Any, stream: torch.cuda.Stream | None, t: _InTransfer, msg: dict[str, Any]) -> None:
        lo, hi, numel = int(msg["lo"]), int(msg["hi"]), int(msg["numel"])
        shape = (hi - lo, 2, len(t.dst), *self.cache.shape[3:])
        if stream is None:  # gloo: on the CPU, synchronously
            buf = torch.empty(numel, dtype=t.dtype)
            pg.recv([buf], 0, 0).wait(td(t.deadline - time.monotonic()))
            if t.ticket is not None:
                self.layout.scatter(self.cache, t.dst, buf.view(shape), (lo, hi))
            t.rx["data"] = t.rx["posted"] = time.monotonic()
            return
        started = time.monotonic()
        with torch.cuda.stream(stream):
            buf = torch.empty(numel, dtype=t.dtype, device=self.cache.device)
            pg.recv([buf], 0, 0).wait()  # the stream waits for the data; this thread does not
            if t.ticket is not None:
                self.layout.scatter(self.cache, t.dst, buf.view(shape), (lo, hi))
        t.bufs.append(buf)
        t.rx["posted"] = time.monotonic()  # the last chunk's receive and scatter are enqueued
        t.rx["post_s"] = t.rx.get("post_s", 0.0) + t.rx["posted"] - started  # this thread's time on the chunks

    def _end_in(self, t: _InTransfer) -> dict[str, Any]:
        """The answer to an ended transfer whose data is in (scattered): finish its claim."""
        t.bufs.clear()
        t.rx["reply"] = time.monotonic()
        if t.ticket is None:
            return {"status": "rejected", "error": t.reason}
        if not t.delivered:
            self._finish(t.rid, t.ticket, False, "the sender aborted the transfer")
            return {"status": "aborted"}
        if self._finish(t.rid, t.ticket, True):
            return {"status": "ok", "rx": t.rx}
        return {"status": "late", "error": "the claim lapsed before the data arrived"}

