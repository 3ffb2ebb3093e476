"""The receiving half of "cuda_ipc" (the wire is in `ipc_sender`): the sender writes into this process's
cache itself; the receiver hands out the cache, claims the blocks and says when the copies are done.

Threads: the listener's accept thread; per sender connection, `IpcServer.serve_pair` on a thread of its own.
That thread answers each KVBegin at once and, for each KVEnd, polls the sender's event (recorded behind the
transfer's copies) before it finishes the claim and answers.
"""

from __future__ import annotations

import torch

from cluster.engine.kv_layout import KVLayout
from cluster.kv_trace import NO_TRACE, RECEIVER_FILE, KVTrace, Timeline
from cluster.transport import kv_transfer_pb2 as kpb
from cluster.transport.api import TransportError, TransportRejected, check_cache
from cluster.transport.control import ControlConn, ControlListener
from cluster.transport.cuda_streams import wait_event
from cluster.transport.expectations import Expectations, WriteTicket
from cluster.transport.ipc_memory import ExportedCache, export_cache
from cluster.transport.receiver import Receiver

_DONE_POLL_S = 2e-5  # the poll of a transfer's copies: they end within about a ms


class IpcServer:
    """Exports the cache once, then serves each sender's connection."""

    def __init__(self, layout: KVLayout, cache: torch.Tensor, expected: Expectations, host: str, secret: str,
                 trace: KVTrace, write_grace_s: float) -> None:
        self.layout, self.cache, self.expected, self.host, self.secret = layout, cache, expected, host, secret
        self.trace, self.write_grace_s = trace, write_grace_s
        self.device_index = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
        self._export: ExportedCache | None = None
        self._listener: ControlListener | None = None

    def start(self) -> str:
        self._export = export_cache(self.cache, self.device_index)
        self._listener = ControlListener(self.host, self.serve_pair, name="kv-cuda_ipc", secret=self.secret)
        return self._listener.endpoint

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def serve_pair(self, conn: ControlConn) -> None:
        """One sender's connection, on its own thread: hand out the cache, then claims and completions, until
        it closes. Claims still open when the connection ends are left to lapse at their deadlines: the sender
        may still be writing (its copies outlive its socket), so only time makes the blocks safe again."""
        claims: dict[int, tuple[str, WriteTicket, Timeline]] = {}
        event: torch.cuda.Event | None = None  # the sender's, recorded after each transfer's copies
        while True:
            try:
                msg = conn.recv(None)
            except TransportError:
                return
            kind = msg.WhichOneof("kind")
            if kind == "ipc_pair":
                event = torch.cuda.Event.from_ipc_handle(self.cache.device, msg.ipc_pair.event_handle)
                conn.send(self._paired())
            elif kind == "begin":
                conn.send(self._claim(msg.begin, claims))
            elif kind in ("end", "abort"):
                seq = msg.end.seq if kind == "end" else msg.abort.seq
                error = None if kind == "end" else msg.abort.reason
                conn.send(self._written(seq, claims.pop(seq, None), event, error))
            else:
                raise TransportError(f"unexpected {kind} message")

    def _paired(self) -> kpb.KVControl:
        e = self._export
        assert e is not None
        return kpb.KVControl(ipc_paired=kpb.IpcPaired(memory_handle=e.handle, offset=e.offset, shape=e.shape,
                                                      dtype=e.dtype))

    def _claim(self, msg: kpb.KVBegin, claims: dict[int, tuple[str, WriteTicket, Timeline]]) -> kpb.KVControl:
        timeline = self.trace.timeline(RECEIVER_FILE, rid=msg.request_id, transport="cuda_ipc")
        timeline.mark("begin")
        dst = list(msg.dst_block_ids)
        try:
            ticket = self.expected.claim(msg.request_id, len(dst), dst, msg.timeout_s + self.write_grace_s)
        except TransportRejected as e:
            return kpb.KVControl(reply=kpb.KVReply(seq=msg.seq, status=kpb.KVReply.REJECTED, error=str(e)))
        claims[msg.seq] = (msg.request_id, ticket, timeline)
        return kpb.KVControl(reply=kpb.KVReply(seq=msg.seq, status=kpb.KVReply.ACCEPTED))

    def _written(self, seq: int, claim: tuple[str, WriteTicket, Timeline] | None, event: torch.cuda.Event | None,
                 error: str | None) -> kpb.KVControl:
        """The sender's copies for `claim` are enqueued (`error` None) or stopped: finish the claim once they are
        done, and say whether it was still current."""
        if claim is None:
            return kpb.KVControl(reply=kpb.KVReply(seq=seq, status=kpb.KVReply.LATE,
                                                   error="the claim lapsed before the write ended"))
        rid, ticket, timeline = claim
        timeline.mark("end")
        ok = error is None
        if ok and event is not None:
            try:  # the copies were enqueued before KVEnd was sent; they take about a ms
                wait_event(event, ticket.write_deadline, max_gap_s=_DONE_POLL_S)
            except (TransportError, RuntimeError) as e:  # late, or a CUDA error (the sender died)
                ok, error = False, f"the sender's copies did not complete: {e}"
        timeline.mark("data")
        current = self.expected.finish(rid, ticket, ok, error)
        timeline.mark("reply")
        if not current:
            return kpb.KVControl(reply=kpb.KVReply(seq=seq, status=kpb.KVReply.LATE,
                                                   error="the claim lapsed before the write ended"))
        if ok:
            timeline.done()
        return kpb.KVControl(reply=kpb.KVReply(seq=seq, status=kpb.KVReply.OK))


def open_receiver(layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1", secret: str = "",
                  trace: KVTrace = NO_TRACE, write_grace_s: float = 5.0) -> Receiver:
    """`write_grace_s`: past a claim's announced timeout, how long a sender may still be writing."""
    if cache.device.type != "cuda":
        raise ValueError("the cuda_ipc transport needs a CUDA KV cache")
    check_cache(layout, cache)
    expected = Expectations()
    return Receiver("cuda_ipc", IpcServer(layout, cache, expected, host, secret, trace, write_grace_s), expected)
