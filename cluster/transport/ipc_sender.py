"""The sending half of "cuda_ipc": two GPU processes on one host; the sender writes straight into the
receiver's cache.

Wire (over the pair's `ControlConn`):
  pairing   IpcPair(the sender's interprocess event) -> IpcPaired(the receiver's cache: handle, offset, shape,
            dtype); the sender maps the cache once per receiver (`ipc_memory`).
  transfer  KVBegin(seq, rid, dst, timeout) -> KVReply(ACCEPTED | REJECTED): the receiver claims the blocks
            before any byte is written. The sender then copies layers into them as they become ready, on a
            stream of its own (`ipc_copy`; a plain send: all layers at once). KVEnd goes right behind the last
            copies, not after them: the sender records its link's event behind the copies and the receiver
            polls that event before it answers (KVReply OK | LATE), so its wake-up overlaps the copy.
  abort     once the sender's copies have stopped: KVAbort -> KVReply.
The claim puts the request in WRITING, so a concurrent forget() waits for the answer (bounded by the claim's
deadline, timeout + grace) and never returns while the sender may still write into those blocks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cluster.engine.kv_layout import KVLayout
from cluster.kv_trace import NO_TRACE, KVTrace, Timeline
from cluster.transport import kv_transfer_pb2 as kpb
from cluster.transport.api import TransportError, TransportRejected
from cluster.transport.control import open_pair
from cluster.transport.cuda_streams import drain, side_stream, wait_stream
from cluster.transport.ipc_copy import BlockCopy
from cluster.transport.ipc_memory import ExportedCache, cupy_module, map_peer_cache, unmap
from cluster.transport.link import Link
from cluster.transport.link_sender import CHUNK_BYTES, Chunking, LinkSender

# Once its own copies are done, the sender polls for the answer without sleeping this long: it is due within
# tens of us, and a thread asleep in select() can wake 0.1-0.5 ms late from a deep CPU idle state.
_REPLY_SPIN_S = 2e-4


@dataclass(eq=False)
class IpcPeer:
    """The receiver's cache mapped here, the stream our copies go on, and the interprocess event recorded
    behind each transfer's copies (the receiver polls it)."""

    cache: torch.Tensor | None
    base: int  # the mapped allocation, for unmap
    stream: torch.cuda.Stream
    event: torch.cuda.Event


class IpcTransfer:
    """One handoff's copies into the receiver's cache."""

    def __init__(self, link: Link[IpcPeer], seq: int, rid: str, dst: list[int], cache: torch.Tensor,
                 device_index: int, timeline: Timeline) -> None:
        self.link, self.seq, self.rid, self.dst, self.cache = link, seq, rid, dst, cache
        self.device_index, self.timeline = device_index, timeline
        self.copy: BlockCopy | None = None

    def begin(self, src: list[int], deadline: float) -> None:
        self.link.ctl.send(kpb.KVControl(begin=kpb.KVBegin(
            seq=self.seq, request_id=self.rid, dst_block_ids=self.dst, timeout_s=deadline - time.monotonic())))
        peer = self.link.peer
        assert peer.cache is not None
        self.copy = BlockCopy(self.cache, peer.cache, src, self.dst, peer.stream, self.device_index,
                              cupy_module())  # while the claim travels
        reply = self.link.await_reply(self.seq, deadline)
        if reply.status != kpb.KVReply.ACCEPTED:
            raise TransportRejected(f"KV receiver {self.link.endpoint} dropped {self.rid!r}: {reply.error}")

    def move(self, src: list[int], lo: int, hi: int, streaming: bool) -> None:
        assert self.copy is not None
        self.copy.layers(lo, hi, streaming)

    def end(self) -> None:
        peer = self.link.peer
        peer.event.record(peer.stream)
        self.link.ctl.send(kpb.KVControl(end=kpb.KVEnd(seq=self.seq)))

    def complete(self, deadline: float) -> None:
        # Our copies first, waited out with the GIL released (the driver spins); the answer then follows
        # within tens of us, so it is polled for (see _REPLY_SPIN_S).
        drain(self.link.peer.stream)
        self.timeline.mark("drained")
        reply = self.link.await_reply(self.seq, max(deadline, time.monotonic() + 1.0), _REPLY_SPIN_S)
        if reply.status != kpb.KVReply.OK:  # written after the receiver stopped waiting: report, loudly
            raise TransportRejected(f"KV write of {self.rid!r} into {self.link.endpoint} was late: {reply.error}")

    def abort(self, send_ordered: Callable[[Any], None], deadline: float) -> None:
        drain(self.link.peer.stream)  # copies always end; waiting with the GIL released costs the engine nothing
        send_ordered(kpb.KVControl(abort=kpb.KVAbort(seq=self.seq, reason="the sender aborted the transfer")))
        self.link.await_reply(self.seq, deadline)


class IpcMover:
    """Maps each receiver's cache once (at pairing) and makes each handoff an `IpcTransfer`."""

    name = "cuda_ipc"

    def __init__(self, layout: KVLayout, cache: torch.Tensor, secret: str, chunk_bytes: int) -> None:
        self.layout, self.cache, self.secret = layout, cache, secret
        self.device_index = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
        # A plain send is one piece: a copy straight into the peer has no pipeline to fill.
        self.chunking = Chunking(chunk_bytes=chunk_bytes, whole_bulk=True)

    def connect(self, endpoint: str, deadline: float) -> Link[IpcPeer]:
        cupy_module()  # a clear error before anything is opened
        with torch.cuda.device(self.device_index):
            event = torch.cuda.Event(interprocess=True)
            handle = event.ipc_handle()
        ask = kpb.KVControl(ipc_pair=kpb.IpcPair(event_handle=handle))
        ctl, msg = open_pair(endpoint, deadline, self.secret, ask, "ipc_paired")
        try:
            paired = msg.ipc_paired
            shape, mine = tuple(paired.shape), tuple(self.cache.shape)
            if paired.dtype != str(self.layout.dtype) or shape[:2] + shape[3:] != mine[:2] + mine[3:]:
                raise TransportError(f"KV receiver {endpoint} has cache {shape}/{paired.dtype}, sender "
                                     f"{mine}/{self.layout.dtype}")
            peer_cache, base = map_peer_cache(ExportedCache(paired.memory_handle, paired.offset, shape, paired.dtype),
                                              self.layout.dtype, self.device_index, ctl)
        except BaseException:
            ctl.close()
            raise
        return Link(endpoint, ctl, IpcPeer(peer_cache, base, side_stream(self.cache.device), event))

    def transfer(self, link: Link[IpcPeer], seq: int, request_id: str, dst: list[int],
                 timeline: Timeline) -> IpcTransfer:
        return IpcTransfer(link, seq, request_id, dst, self.cache, self.device_index, timeline)

    def close_link(self, link: Link[IpcPeer], polite: bool) -> None:
        """Unmap the peer's cache (once our copies are done) and drop the control connection."""
        peer = link.peer
        with contextlib.suppress(Exception):
            wait_stream(peer.stream, time.monotonic() + 5.0)
        peer.cache = None
        if peer.base:
            with contextlib.suppress(Exception):
                unmap(peer.base, self.device_index)
            peer.base = 0
        link.ctl.close()

    def close(self) -> None:
        pass


def open_sender(layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1", secret: str = "",
                trace: KVTrace = NO_TRACE, chunk_bytes: int = CHUNK_BYTES) -> LinkSender:
    """`host` is unused (the receiver's endpoint says where to connect); same-host peers only."""
    if cache.device.type != "cuda":
        raise ValueError("the cuda_ipc transport needs a CUDA KV cache")
    return LinkSender(IpcMover(layout, cache, secret, chunk_bytes), layout, cache, trace)
