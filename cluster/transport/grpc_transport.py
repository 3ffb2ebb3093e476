""""grpc": KV blocks as raw bytes over one client-streaming gRPC call (works between any two hosts).

Wire (kv_transfer.proto, service pdserve.transport.v1.KVTransfer):
  PushKV(stream KVChunk) -> PushKVReply
  chunk 0 carries the KVHeader (request id, receiver dst ids, dtype, shape, nbytes) and the first bytes;
  every chunk carries up to chunk_bytes (default 4 MiB) of the gathered tensor ([L, 2, n, block, heads, dim], C
  order, raw little-endian bytes of the dtype). The receiver rejects at once (REJECTED, before reading the
  rest) a request it does not expect; otherwise it assembles the bytes in a host buffer, then claims the
  request, scatters into its cache and answers OK. The call's deadline is the sender's timeout, so a dead or
  stuck receiver surfaces as DEADLINE_EXCEEDED / UNAVAILABLE -> TransportError.

Threads: the sender's `send` runs on the caller's thread (no streaming: everything at `finish`); the receiver
serves each call on a thread of its gRPC server's pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import torch

from cluster.engine.kv_layout import KVLayout
from cluster.kv_trace import NO_TRACE, KVTrace
from cluster.secret import METADATA_KEY, mac, metadata_value, same
from cluster.transport import kv_transfer_pb2 as pb
from cluster.transport import kv_transfer_pb2_grpc as pb_grpc
from cluster.transport.api import TransportError, TransportRejected, check_cache, format_endpoint
from cluster.transport.expectations import Expectations
from cluster.transport.receiver import Receiver

CHUNK_BYTES = 4 << 20  # default payload bytes per message
_MAX_MSG = 64 << 20  # what a receiver accepts per message: chunks up to ~60 MB plus the header
_OPTIONS = [("grpc.max_receive_message_length", _MAX_MSG), ("grpc.max_send_message_length", _MAX_MSG)]
_MAX_SCATTER_S = 60.0


def _token(secret: str) -> str:
    """What a sender shows a receiver; not the WorkerService token: a receiver sees it."""
    return mac(secret, "kv-grpc") if secret else ""


def _as_bytes_view(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor, no copy (numpy has no bfloat16: go through uint8)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server

    def PushKV(self, request_iterator: Iterator[pb.KVChunk], context: grpc.ServicerContext) -> pb.PushKVReply:  # noqa: N802
        return self.server.receive(request_iterator, context)


class GrpcServer:
    """The receiving half: an in-process gRPC server (thread pool, port 0)."""

    def __init__(self, layout: KVLayout, cache: torch.Tensor, expected: Expectations, host: str, secret: str,
                 max_workers: int) -> None:
        self.layout, self.cache, self.expected, self.host = layout, cache, expected, host
        self._token = _token(secret)
        self._max_workers = max_workers
        self._server: grpc.Server | None = None

    def start(self) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(self._max_workers, "kv-grpc"), options=_OPTIONS)
        pb_grpc.add_KVTransferServicer_to_server(_Servicer(self), server)
        port = server.add_insecure_port(format_endpoint(self.host, 0))
        if not port:
            raise TransportError(f"could not bind a gRPC port on {self.host}")
        server.start()
        self._server = server
        return format_endpoint(self.host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)

    def receive(self, chunks: Iterator[pb.KVChunk], context: grpc.ServicerContext) -> pb.PushKVReply:
        def fail(status: int, error: str) -> pb.PushKVReply:
            return pb.PushKVReply(status=status, error=error)  # type: ignore[arg-type]

        if self._token and not same(metadata_value(context.invocation_metadata(), METADATA_KEY) or "", self._token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this KV receiver needs the cluster secret")
        first = next(chunks, None)
        if first is None or not first.HasField("header"):
            return fail(pb.PushKVReply.ERROR, "stream does not start with a header")
        h = first.header
        rid, dst, shape = h.request_id, list(h.dst_block_ids), tuple(h.shape)
        if h.dtype != str(self.layout.dtype) or (dst and shape != self.layout.cache_shape(len(dst))):
            return fail(pb.PushKVReply.REJECTED, f"layout mismatch: got {shape}/{h.dtype}, expected "
                                                 f"{self.layout.cache_shape(len(dst))}/{self.layout.dtype}")
        if not self.expected.expects(rid):  # early drop, before reading the payload; the claim below re-checks
            return fail(pb.PushKVReply.REJECTED, f"receiver does not expect request {rid!r}")
        buf = torch.empty(shape if dst else (0,), dtype=self.layout.dtype)
        view = np.asarray(_as_bytes_view(buf))
        if h.nbytes != view.nbytes:
            return fail(pb.PushKVReply.ERROR, f"header says {h.nbytes} bytes, shape needs {view.nbytes}")
        off = 0
        for chunk in _chain(first, chunks):
            n = len(chunk.data)
            if off + n > view.nbytes:
                return fail(pb.PushKVReply.ERROR, "more payload than the header announced")
            view[off:off + n] = np.frombuffer(chunk.data, dtype=np.uint8)
            off += n
        if off != view.nbytes:
            return fail(pb.PushKVReply.ERROR, f"stream ended after {off} of {view.nbytes} bytes")
        if not context.is_active():  # the sender gave up (deadline, cancel): don't write behind its back
            return fail(pb.PushKVReply.ERROR, "sender went away")
        try:
            ticket = self.expected.claim(rid, len(dst), dst, _MAX_SCATTER_S)
        except TransportRejected as e:
            return fail(pb.PushKVReply.REJECTED, str(e))
        try:
            if dst:
                self.layout.scatter(self.cache, ticket.dst_block_ids, buf)
                if self.cache.device.type == "cuda":
                    torch.cuda.current_stream(self.cache.device).synchronize()
        except Exception as e:
            self.expected.finish(rid, ticket, False, str(e))
            return fail(pb.PushKVReply.ERROR, f"scatter failed: {e}")
        self.expected.finish(rid, ticket, True)
        return pb.PushKVReply(status=pb.PushKVReply.OK)


class GrpcSender:
    """The sending half: one channel per receiver endpoint; a send gathers the blocks into host memory and
    streams them in one call."""

    name = "grpc"

    def __init__(self, layout: KVLayout, cache: torch.Tensor, secret: str, chunk_bytes: int) -> None:
        check_cache(layout, cache)
        if not 0 < chunk_bytes <= _MAX_MSG - (4 << 20):
            raise ValueError(f"chunk_bytes must be in (0, {_MAX_MSG - (4 << 20)}], got {chunk_bytes}")
        self.layout, self.cache = layout, cache
        self._token = _token(secret)
        self._chunk = chunk_bytes
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.KVTransferStub]] = {}
        self._closed = False

    def open_send(self, endpoint: str, request_id: str, dst_block_ids: list[int], timeout_s: float) -> WholeSend:
        return WholeSend(self, endpoint, request_id, list(dst_block_ids), timeout_s)

    def _stub(self, endpoint: str) -> pb_grpc.KVTransferStub:
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            if endpoint not in self._stubs:
                channel = grpc.insecure_channel(endpoint, options=_OPTIONS)
                self._stubs[endpoint] = (channel, pb_grpc.KVTransferStub(channel))
            return self._stubs[endpoint][1]

    def send(self, endpoint: str, request_id: str, src_block_ids: list[int], dst_block_ids: list[int],
             timeout_s: float) -> None:
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destinations")
        t0 = time.monotonic()
        data = (self.layout.gather(self.cache, src_block_ids).cpu() if src_block_ids
                else torch.empty(0, dtype=self.layout.dtype))
        header = pb.KVHeader(request_id=request_id, dst_block_ids=dst_block_ids, dtype=str(data.dtype),
                             shape=list(data.shape), nbytes=data.numel() * data.element_size())
        left = timeout_s - (time.monotonic() - t0)
        try:
            if left <= 0:
                raise TransportError("KV send timed out while gathering")
            reply = self._stub(endpoint).PushKV(_chunks(header, _as_bytes_view(data), self._chunk), timeout=left,
                                                metadata=((METADATA_KEY, self._token),) if self._token else None)
        except grpc.RpcError as e:
            code: Any = e.code() if isinstance(e, grpc.Call) else None
            if code == grpc.StatusCode.UNAVAILABLE:
                self._drop_channel(endpoint)
            detail = e.details() if isinstance(e, grpc.Call) else str(e)
            raise TransportError(f"KV send of {request_id!r} to {endpoint} failed: {code}: {detail}") from e
        if reply.status == pb.PushKVReply.REJECTED:
            raise TransportRejected(f"KV receiver {endpoint} dropped {request_id!r}: {reply.error}")
        if reply.status != pb.PushKVReply.OK:
            raise TransportError(f"KV receiver {endpoint} failed {request_id!r}: {reply.error}")

    def _drop_channel(self, endpoint: str) -> None:
        with self._lock:
            entry = self._stubs.pop(endpoint, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stubs, self._stubs = list(self._stubs.values()), {}
        for channel, _ in stubs:
            channel.close()


class WholeSend:
    """A send stream that cannot stream: everything moves in one `send` at `finish`."""

    def __init__(self, sender: GrpcSender, endpoint: str, request_id: str, dst: list[int], timeout_s: float) -> None:
        self._sender, self._endpoint, self._rid = sender, endpoint, request_id
        self._dst, self._timeout_s = dst, timeout_s

    def layers_ready(self, src_block_ids: list[int], upto: int) -> None:
        pass

    def finish(self, src_block_ids: list[int]) -> None:
        self._sender.send(self._endpoint, self._rid, src_block_ids, self._dst, self._timeout_s)

    def abort(self) -> None:
        pass


def _chain(first: pb.KVChunk, rest: Iterator[pb.KVChunk]) -> Iterator[pb.KVChunk]:
    yield first
    yield from rest


def _chunks(header: pb.KVHeader, payload: memoryview, size: int) -> Iterator[pb.KVChunk]:
    yield pb.KVChunk(header=header, data=bytes(payload[:size]))
    for off in range(size, len(payload), size):
        yield pb.KVChunk(data=bytes(payload[off:off + size]))


def open_sender(layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1", secret: str = "",
                trace: KVTrace = NO_TRACE, chunk_bytes: int = CHUNK_BYTES) -> GrpcSender:
    """`host` and `trace` are unused: the endpoint says where, and a grpc send has no phases worth a trace."""
    return GrpcSender(layout, cache, secret, chunk_bytes)


def open_receiver(layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1", secret: str = "",
                  trace: KVTrace = NO_TRACE, max_workers: int = 4) -> Receiver:
    check_cache(layout, cache)
    expected = Expectations()
    return Receiver("grpc", GrpcServer(layout, cache, expected, host, secret, max_workers), expected)
