"""The sending half of "gloo" and "nccl": torch.distributed point-to-point over a pair's process group.

Wire (sender = rank 0; control over the pair's `ControlConn`, data over the group):
  pairing   DistPair -> DistPaired(pair_id, store_port); both join the group (`dist_group`).
  transfer  KVBegin(seq, rid, dst, dtype, block shape, timeout), then per chunk of layers KVLayers(seq, lo, hi,
            numel) followed by ONE send of those layers of the blocks (gathered: [hi - lo, 2, n, block, heads,
            dim]); KVEnd right behind the last chunk (or KVAbort instead) -> KVReply(OK | REJECTED | ABORTED |
            LATE). Transfers may interleave by chunk.
  teardown  KVBye, or the connection closing; any failure drops the pair (and aborts its group).
gloo moves CPU tensors (a CUDA cache is staged through host memory), synchronously; nccl keeps everything
on the GPU: gathers and sends go on the link's stream, behind the model's writes of those layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cluster.engine.kv_layout import KVLayout
from cluster.kv_trace import NO_TRACE, KVTrace, Timeline
from cluster.transport import kv_transfer_pb2 as kpb
from cluster.transport.api import TransportError, TransportRejected, parse_endpoint, time_left
from cluster.transport.control import open_pair
from cluster.transport.cuda_streams import device_ids, side_stream
from cluster.transport.dist_group import PairGroups, td
from cluster.transport.link import Link
from cluster.transport.link_sender import CHUNK_BYTES, Chunking, LinkSender

# A gloo send blocks until it is received, so it must not run inside the forward: everything at finish().
# A streamed transfer goes in at most 4 chunks: the receiver posts each chunk from Python, where every post
# waits for the GIL under load; a plain send keeps its big chunks, where the gather/send/scatter pipeline pays.
_MAX_STREAM_CHUNKS = 4


@dataclass(eq=False)
class DistPeer:
    """A pair's group, and (nccl) the stream where this end gathers and sends."""

    pg: Any
    stream: torch.cuda.Stream | None


class DistTransfer:
    """One handoff's chunks over a pair's group."""

    def __init__(self, link: Link[DistPeer], seq: int, rid: str, dst: list[int], layout: KVLayout,
                 cache: torch.Tensor) -> None:
        self.link, self.seq, self.rid, self.dst, self.layout, self.cache = link, seq, rid, dst, layout, cache
        self.src_idx: torch.Tensor | None = None
        self.bufs: list[torch.Tensor] = []  # gathered chunks, alive until the receiver has them
        self.deadline = 0.0

    def begin(self, src: list[int], deadline: float) -> None:
        lay = self.layout
        self.deadline = deadline
        self.link.ctl.send(kpb.KVControl(begin=kpb.KVBegin(
            seq=self.seq, request_id=self.rid, dst_block_ids=self.dst, timeout_s=time_left(self.deadline),
            dtype=str(lay.dtype), block_shape=[lay.block_size, lay.num_kv_heads, lay.head_dim])))

    def move(self, src: list[int], lo: int, hi: int, streaming: bool) -> None:
        cache, link, peer = self.cache, self.link, self.link.peer
        numel = (hi - lo) * cache[0, 0, 0].numel() * 2 * len(src)
        link.ctl.send(kpb.KVControl(layers=kpb.KVLayers(seq=self.seq, lo=lo, hi=hi, numel=numel)))
        if peer.stream is None:  # gloo: synchronous, through host memory
            data = self.layout.gather(cache, src, (lo, hi)).reshape(-1).cpu()
            peer.pg.send([data], 1, 0).wait(td(time_left(self.deadline)))
            return
        peer.stream.wait_stream(torch.cuda.current_stream(cache.device))  # behind the layers' KV writes
        with torch.cuda.stream(peer.stream):
            if self.src_idx is None:
                self.src_idx = device_ids(src, cache.device)
            self.bufs.append(self.layout.gather(cache, self.src_idx, (lo, hi)).view(-1))
            peer.pg.send([self.bufs[-1]], 1, 0)

    def end(self) -> None:
        self.link.ctl.send(kpb.KVControl(end=kpb.KVEnd(seq=self.seq)))

    def _reply(self, deadline: float) -> kpb.KVReply:
        try:
            return self.link.await_reply(self.seq, deadline)
        finally:
            self.bufs.clear()

    def complete(self, deadline: float) -> None:
        reply = self._reply(deadline)
        if reply.status == kpb.KVReply.OK:
            return
        if reply.status in (kpb.KVReply.REJECTED, kpb.KVReply.LATE):
            raise TransportRejected(f"KV receiver {self.link.endpoint} dropped {self.rid!r}: {reply.error}")
        raise TransportError(f"KV receiver {self.link.endpoint} failed {self.rid!r}: {reply.error}")

    def abort(self, send_ordered: Callable[[Any], None], deadline: float) -> None:
        send_ordered(kpb.KVControl(abort=kpb.KVAbort(seq=self.seq, reason="the sender aborted the transfer")))
        self._reply(deadline)


class DistMover:
    """Pairs over torch.distributed and makes each handoff a `DistTransfer`."""

    def __init__(self, backend: str, layout: KVLayout, cache: torch.Tensor, host: str, secret: str,
                 chunk_bytes: int, stream_layers: bool | None) -> None:
        self.name = backend
        self.layout, self.cache, self.secret = layout, cache, secret
        self.groups = PairGroups(backend, host, cache.device)
        streams = backend == "nccl" if stream_layers is None else stream_layers
        self.chunking = Chunking(streams=streams, chunk_bytes=chunk_bytes, max_stream_chunks=_MAX_STREAM_CHUNKS)

    def connect(self, endpoint: str, deadline: float) -> Link[DistPeer]:
        ask = kpb.KVControl(dist_pair=kpb.DistPair(timeout_s=time_left(deadline)))
        ctl, msg = open_pair(endpoint, deadline, self.secret, ask, "dist_paired")
        try:
            pg = self.groups.join(parse_endpoint(endpoint)[0], msg.dist_paired.store_port, msg.dist_paired.pair_id,
                                  0, time_left(deadline))
        except BaseException:
            ctl.close()
            raise
        return Link(endpoint, ctl, DistPeer(pg, side_stream(self.cache.device) if self.groups.cuda else None))

    def transfer(self, link: Link[DistPeer], seq: int, request_id: str, dst: list[int],
                 timeline: Timeline) -> DistTransfer:
        return DistTransfer(link, seq, request_id, dst, self.layout, self.cache)

    def close_link(self, link: Link[DistPeer], polite: bool) -> None:
        if polite:
            with contextlib.suppress(Exception):
                link.ctl.send(kpb.KVControl(bye=kpb.KVBye()))
        self.groups.drop(link.peer.pg, wait_s=5.0 if polite else 0.0)
        link.ctl.close()

    def close(self) -> None:
        self.groups.close()


def open_sender(layout: KVLayout, cache: torch.Tensor, *, backend: str, host: str = "127.0.0.1",
                secret: str = "", trace: KVTrace = NO_TRACE, chunk_bytes: int = CHUNK_BYTES,
                stream_layers: bool | None = None) -> LinkSender:
    """`backend` "gloo" (CPU wire tensors; any two hosts) or "nccl" (both caches on CUDA). `host`: where this
    end's gloo sockets bind; `stream_layers`: override the backend's choice (gloo: False, see above)."""
    if backend == "nccl":
        if cache.device.type != "cuda":
            raise ValueError("the nccl transport needs a CUDA KV cache")
        if not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL")
    return LinkSender(DistMover(backend, layout, cache, host, secret, chunk_bytes, stream_layers), layout, cache,
                      trace)
