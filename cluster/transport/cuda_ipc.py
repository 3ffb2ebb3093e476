""""cuda_ipc": two GPU processes on one host; the sender writes straight into the receiver's cache.

Cache export: the receiver exports the CUDA IPC handle of the allocation that holds its cache, once.
PyTorch's caching allocator may have placed the cache inside a bigger cudaMalloc segment, so the
receiver looks up the segment's base with the driver's cuMemGetAddressRange (through ctypes on
libcuda, so no cuda-python dependency), exports `cudaIpcGetMemHandle(base)` and publishes
`offset = cache.data_ptr() - base`.
The sender maps the segment once per receiver (`cudaIpcOpenMemHandle`, lazy peer access), wraps
[base + offset, + cache bytes) as a tensor of the cache's shape on its own device (cupy memory ->
DLPack), and copies with PyTorch kernels: gather its source blocks, scatter into the peer view
(over NVLink / PCIe peer access). Memory from `expandable_segments` (cuMem VMM) cannot be exported
this way: listen() raises.

Control channel (TCPStore hosted by the receiver, see _store_ctl):
  {"op": "pair"}                                   -> {"status": "ok", "handle", "offset", "shape", "dtype"}
  {"op": "claim", "seq", "rid", "dst", "timeout"}  -> {"seq", "status": "go" | "rejected", "error"}
  (sender writes into the claimed blocks, synchronises its stream)
  {"op": "done", "seq", "rid", "ok", "error"}      -> {"seq", "status": "ok" | "late", "error"}
The claim puts the request in WRITING, so a concurrent forget() waits for "done" (bounded by the claim's
deadline, timeout + grace) and never returns while the sender may still write into those blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cluster.engine.kv_layout import KVLayout
from cluster.transport._paired import OutPair, PairedTransport
from cluster.transport._store_ctl import StoreClient, StoreServer
from cluster.transport.base import TransportError, TransportRejected, _Expected

_IPC_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("the cuda_ipc KV transport needs cupy (pip install cupy-cuda12x)") from e
    return cupy


def _segment_base(ptr: int) -> tuple[int, int]:
    """(base, size) of the cudaMalloc allocation containing device pointer `ptr` (current context)."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    fn = libcuda.cuMemGetAddressRange_v2
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    rc = fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise RuntimeError(f"cuMemGetAddressRange failed with CUresult {rc}")
    return base.value, size.value


@dataclass
class _OutPair(OutPair):
    peer_ptr: int = 0  # the mapped segment base, for ipcCloseMemHandle
    peer_cache: torch.Tensor | None = None


class CudaIpcTransport(PairedTransport):
    """Same-host GPU to GPU through CUDA IPC; the copy is a PyTorch gather/scatter into peer memory."""

    name: ClassVar[str] = "cuda_ipc"
    _pair_type = _OutPair
    _keep_pair_on = TransportError  # _transfer itself disconnects where the pair is out of step

    def __init__(self, layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1",
                 write_grace_s: float = 5.0) -> None:
        if cache.device.type != "cuda":
            raise ValueError("the cuda_ipc transport needs a CUDA KV cache")
        super().__init__(layout, cache, host=host)
        self._dev = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
        self._grace = write_grace_s
        self._server: StoreServer | None = None
        self._export: dict[str, Any] = {}
        self._tickets: dict[tuple[int, int], tuple[str, _Expected]] = {}

    # --- receiver -----------------------------------------------------------------------------------
    def listen(self) -> str:
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            if self._server is None:
                cupy = _cupy()
                ptr, nbytes = self.cache.data_ptr(), self.cache.numel() * self.cache.element_size()
                try:
                    with torch.cuda.device(self._dev), cupy.cuda.Device(self._dev):
                        base, size = _segment_base(ptr)
                        if not base <= ptr <= ptr + nbytes <= base + size:
                            raise RuntimeError(f"cache [{ptr:#x}, +{nbytes}) outside [{base:#x}, +{size})")
                        handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
                except Exception as e:  # e.g. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (cuMem VMM)
                    raise TransportError(f"cannot export the KV cache for CUDA IPC: {e}") from e
                self._export = {"status": "ok", "handle": handle.hex(), "offset": ptr - base,
                                "shape": list(self.cache.shape), "dtype": str(self.cache.dtype)}
                self._server = StoreServer(self.host, self._on_ctl, name="kv-cuda-ipc")
            return self._server.endpoint

    def _on_ctl(self, msg: dict[str, Any]) -> None:
        server = self._server
        if server is None:
            return
        pair, op, seq = int(msg["pair"]), msg["op"], msg.get("seq")
        if op == "pair":
            server.reply(pair, self._export)
        elif op == "claim":
            rid, dst = str(msg["rid"]), [int(b) for b in msg["dst"]]
            try:
                ticket = self._claim(rid, len(dst), dst, float(msg["timeout"]) + self._grace)
            except TransportRejected as e:
                server.reply(pair, {"seq": seq, "status": "rejected", "error": str(e)})
                return
            with self._lock:
                self._tickets[(pair, seq)] = (rid, ticket)
            server.reply(pair, {"seq": seq, "status": "go"})
        elif op == "done":
            with self._lock:
                rid, ticket = self._tickets.pop((pair, seq), (str(msg["rid"]), None))
            current = ticket is not None and self._finish(rid, ticket, bool(msg["ok"]), msg.get("error"))
            server.reply(pair, {"seq": seq, "status": "ok" if current else "late",
                                "error": None if current else "the claim lapsed before the write ended"})

    # --- sender -------------------------------------------------------------------------------------
    def _connect(self, pair: _OutPair, deadline: float) -> None:
        cupy = _cupy()
        pair.ctl = StoreClient(pair.endpoint, self._left(deadline))
        pair.ctl.push({"op": "pair"}, self._left(deadline))
        meta = pair.ctl.wait_reply(self._left(deadline))
        shape, dtype = tuple(meta["shape"]), meta["dtype"]
        mine = tuple(self.cache.shape)
        if dtype != str(self.layout.dtype) or shape[:2] + shape[3:] != mine[:2] + mine[3:]:
            raise TransportError(f"KV receiver {pair.endpoint} has cache {shape}/{dtype}, sender "
                                 f"{tuple(self.cache.shape)}/{self.layout.dtype}")
        nbytes = self.cache.element_size()
        for s in shape:
            nbytes *= s
        with cupy.cuda.Device(self._dev):
            base = cupy.cuda.runtime.ipcOpenMemHandle(bytes.fromhex(meta["handle"]), _IPC_LAZY_ENABLE_PEER_ACCESS)
            mem = cupy.cuda.UnownedMemory(base + int(meta["offset"]), nbytes, pair, self._dev)
            flat = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        pair.peer_ptr = base
        pair.peer_cache = torch.from_dlpack(flat).view(self.layout.dtype).view(shape)

    def _transfer(self, pair: _OutPair, rid: str, src: list[int], dst: list[int], deadline: float) -> None:
        try:
            if pair.peer_cache is None:
                self._connect(pair, deadline)
            assert pair.ctl is not None and pair.peer_cache is not None
            pair.seq += 1
            pair.ctl.push({"op": "claim", "seq": pair.seq, "rid": rid, "dst": list(dst),
                           "timeout": self._left(deadline)}, self._left(deadline))
            reply = pair.ctl.wait_reply(self._left(deadline))
        except TransportError:
            self._disconnect(pair)
            raise
        if reply.get("seq") != pair.seq:
            self._disconnect(pair)
            raise TransportError(f"KV receiver {pair.endpoint} answered seq {reply.get('seq')}, sent {pair.seq}")
        if reply["status"] != "go":
            raise TransportRejected(f"KV receiver {pair.endpoint} dropped {rid!r}: {reply.get('error')}")
        ok, error = False, None
        try:
            self._left(deadline)  # the claim expires at its deadline (+ grace): never start a write after it
            if src:
                with torch.cuda.device(self._dev):
                    self.layout.scatter(pair.peer_cache, dst, self.layout.gather(self.cache, src))
                    torch.cuda.current_stream().synchronize()
            ok = True
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        try:
            left = max(deadline - time.monotonic(), 1.0)
            pair.ctl.push({"op": "done", "seq": pair.seq, "rid": rid, "ok": ok, "error": error}, left)
            done = pair.ctl.wait_reply(left)
        except TransportError:
            self._disconnect(pair)
            raise
        if not ok:
            raise TransportError(f"KV write of {rid!r} into {pair.endpoint} failed: {error}")
        if done.get("status") != "ok":  # written after the receiver stopped waiting: report, loudly
            raise TransportError(f"KV write of {rid!r} into {pair.endpoint} was late: {done.get('error')}")

    def _disconnect(self, pair: _OutPair) -> None:
        """Unmap the peer's cache and drop the control connection. Caller holds pair.lock."""
        pair.peer_cache = None
        if pair.peer_ptr:
            with contextlib.suppress(Exception):
                cupy = _cupy()
                with cupy.cuda.Device(self._dev):
                    cupy.cuda.runtime.ipcCloseMemHandle(pair.peer_ptr)
            pair.peer_ptr = 0
        pair.ctl = None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            server, self._server = self._server, None
            pairs = list(self._out.values())
        self._disconnect_pairs(pairs)
        if server is not None:
            server.close()
