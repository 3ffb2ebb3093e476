""""cuda_ipc": two GPU processes on one host; the sender writes straight into the receiver's cache.

Cache export: the receiver exports the CUDA IPC handle of the allocation that holds its cache, once.
PyTorch's caching allocator may have placed the cache inside a bigger cudaMalloc segment, so the
receiver looks up the segment's base with the driver's cuMemGetAddressRange (through ctypes on
libcuda, so no cuda-python dependency), exports `cudaIpcGetMemHandle(base)` and publishes
`offset = cache.data_ptr() - base`.
The sender maps the segment once per receiver (`cudaIpcOpenMemHandle`, lazy peer access), wraps
[base + offset, + cache bytes) as a tensor of the cache's shape on its own device (cupy memory ->
DLPack), and copies block to block into that view, per chunk of layers (a plain send: all layers at once),
over NVLink / PCIe peer access. Where the source and destination ids form few runs of consecutive blocks
(up to 32: what a cache under churn mostly gives), each run is ONE 2D copy on the copy engine
(cudaMemcpy2DAsync: a row per layer and key/value), which moves ~395 GB/s over NV18 and takes no SMs from
a prefill it runs beside; scattered ids take the Triton block-to-block kernel (`engine/kernels/block_copy.py`,
~370 GB/s). Memory from `expandable_segments` (cuMem VMM) cannot be exported this way: listen() raises.

Control channel: the pair's socket (`_sock_ctl`), one connection per sender, served on its own thread:
  {"op": "pair", "event"}                          -> {"status": "ok", "handle", "offset", "shape", "dtype"}
  {"op": "claim", "seq", "rid", "dst", "timeout"}  -> {"seq", "status": "go" | "rejected", "error"}
  (the sender copies layers into the claimed blocks as they become ready, block to block with no staging
  buffer, on a stream of its own)
  {"op": "done", "seq", "rid", "ok", "error"}      -> {"seq", "status": "ok" | "late", "error"}
"done" with ok=True goes right behind the last copies, not after them: the sender records its link's CUDA
IPC event ("event" at pairing) after the copies, and the receiver polls that event before it answers, so
its wake-up overlaps the copy. An abort sends ok=False once the sender's copies have stopped.
The claim puts the request in WRITING, so a concurrent forget() waits for "done" (bounded by the claim's
deadline, timeout + grace) and never returns while the sender may still write into those blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cluster.engine.kv_layout import KVLayout
from cluster.transport._link import Link
from cluster.transport._paired import PairedSendStream, PairedTransport
from cluster.transport._sock_ctl import CtlConn
from cluster.transport._streams import device_ids, drain, wait_event, wait_stream
from cluster.transport.base import TransportError, TransportRejected, _Expected

STREAMING_PROGRAMS = 16  # thread blocks per copy beside a prefill (of 132 SMs on an H100/H200)
# More runs of consecutive blocks than this: the kernel. At 21-24 runs a 2K handoff still copies faster on the
# copy engine (0.74-0.75 ms) than with the kernel on every SM (0.77 ms): docs/results/probe_ce_split.txt.
COPY_ENGINE_MAX_RUNS = 32
_MEMCPY_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice
_DONE_POLL_S = 2e-5  # the receiver's poll of a transfer's copies: they end within about a ms
_REPLY_SPIN_S = 2e-4  # the sender's poll for the answer once its copies are done: it is due within tens of us
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


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(first source block, first destination block, length) of each maximal run where both id lists
    advance by one together: `src[i:i+n] == range(s, s+n)` and `dst[i:i+n] == range(d, d+n)`."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(src) + 1):
        if i == len(src) or src[i] != src[i - 1] + 1 or dst[i] != dst[i - 1] + 1:
            runs.append((src[start], dst[start], i - start))
            start = i
    return runs


@dataclass(eq=False)
class _IpcLink(Link):
    peer_ptr: int = 0  # the mapped segment base, for ipcCloseMemHandle
    peer_cache: torch.Tensor | None = None
    stream: torch.cuda.Stream | None = None  # where the copies run
    event: torch.cuda.Event | None = None  # interprocess: recorded after a transfer's copies, polled by the peer


class _IpcSendStream(PairedSendStream):
    t: CudaIpcTransport
    link: _IpcLink

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.idx: tuple[torch.Tensor, torch.Tensor] | None = None
        self.runs: list[tuple[int, int, int]] | None = None

    def _begin(self, src: list[int]) -> None:
        self.link.ctl.send({"op": "claim", "seq": self.seq, "rid": self.rid, "dst": self.dst, "timeout": self.left()})
        self._prepare(src)  # while the claim travels
        reply = self.link.await_reply(self.seq, self.deadline or 0.0)
        if reply.get("status") != "go":
            self.done = True  # nothing to tell the receiver at abort
            raise TransportRejected(f"KV receiver {self.pair.endpoint} dropped {self.rid!r}: {reply.get('error')}")

    def _send_layers(self, src: list[int], lo: int, hi: int) -> None:
        from cluster.engine.kernels.block_copy import copy_blocks

        cache, link = self.t.cache, self.link
        assert link.stream is not None and link.peer_cache is not None
        link.stream.wait_stream(torch.cuda.current_stream(cache.device))  # behind the layers' KV writes
        if self.idx is None:
            self._copy_runs(lo, hi)
            return
        with torch.cuda.stream(link.stream):
            copy_blocks(cache, link.peer_cache, *self.idx, lo, hi,
                        max_programs=STREAMING_PROGRAMS if self.streaming else None)

    def _prepare(self, src: list[int]) -> None:
        """Pick the copy: few runs of consecutive ids -> copy engine; else the kernel, ids sent to the GPU now."""
        self.runs = block_runs(src, self.dst)
        if len(self.runs) > COPY_ENGINE_MAX_RUNS:
            assert self.link.stream is not None
            with torch.cuda.stream(self.link.stream):
                self.idx = device_ids(src, self.t.cache.device), device_ids(self.dst, self.t.cache.device)

    def _copy_runs(self, lo: int, hi: int) -> None:
        """Layers [lo, hi) of each run as one 2D copy-engine copy: rows are (layer, key/value) planes."""
        cache, peer, stream = self.t.cache, self.link.peer_cache, self.link.stream
        assert peer is not None and stream is not None and self.runs is not None
        size = cache.element_size()
        assert cache.is_contiguous() and peer.is_contiguous()  # so the planes of [lo, hi) are evenly spaced rows
        block, src_pitch, dst_pitch = cache.stride(2) * size, cache.stride(1) * size, peer.stride(1) * size
        src0, dst0 = cache.data_ptr() + 2 * lo * src_pitch, peer.data_ptr() + 2 * lo * dst_pitch
        memcpy2d = _cupy().cuda.runtime.memcpy2DAsync
        with _cupy().cuda.Device(self.t._dev):
            for s, d, n in self.runs:
                memcpy2d(dst0 + d * block, dst_pitch, src0 + s * block, src_pitch, n * block, 2 * (hi - lo),
                         _MEMCPY_DEVICE_TO_DEVICE, stream.cuda_stream)

    def _all_sent(self) -> None:
        """Every copy is enqueued: record the link's event behind them and say "done" now (pair.lock held)."""
        assert self.link.stream is not None and self.link.event is not None
        self.link.event.record(self.link.stream)
        self.link.ctl.send({"op": "done", "seq": self.seq, "rid": self.rid, "ok": True, "error": None})
        self.ended = True

    def _reply(self, spin_s: float = 0.0) -> dict[str, Any]:
        return self.link.await_reply(self.seq, max(self.deadline or 0.0, time.monotonic() + 1.0), spin_s)

    def _complete(self) -> dict[str, Any]:
        # Wait out our copies first (GIL released, the driver spins): a thread asleep in recv() for the whole
        # copy wakes 0.1-0.5 ms late from a deep CPU idle state; the reply then follows in tens of us.
        assert self.link.stream is not None
        drain(self.link.stream)
        self.times["drained"] = time.monotonic()  # our copies are done (trace)
        reply = self._reply(_REPLY_SPIN_S)
        if reply.get("status") != "ok":  # written after the receiver stopped waiting: report, loudly
            raise TransportRejected(f"KV write of {self.rid!r} into {self.pair.endpoint} was late: "
                                    f"{reply.get('error')}")
        return reply

    def _abort(self) -> None:
        assert self.link.stream is not None
        drain(self.link.stream)  # copies always end; waiting with the GIL released costs the engine nothing
        self._locked(self.link.ctl.send, {"op": "done", "seq": self.seq, "rid": self.rid, "ok": False,
                                          "error": "the sender aborted the transfer"})
        self._reply()


class CudaIpcTransport(PairedTransport):
    """Same-host GPU to GPU through CUDA IPC: block-to-block copies per chunk of layers into peer memory."""

    name: ClassVar[str] = "cuda_ipc"
    _stream_type = _IpcSendStream
    whole_bulk: ClassVar[bool] = True

    def __init__(self, layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1",
                 write_grace_s: float = 5.0, **kw: Any) -> None:
        if cache.device.type != "cuda":
            raise ValueError("the cuda_ipc transport needs a CUDA KV cache")
        super().__init__(layout, cache, host=host, **kw)
        self._dev = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
        self._grace = write_grace_s
        self._export: dict[str, Any] = {}
        self._pair_ids = itertools.count(1)

    # --- receiver -----------------------------------------------------------------------------------
    def _prepare_listen(self) -> None:
        """Export the cache's CUDA IPC handle (what "pair" answers)."""
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

    def _serve_pair(self, conn: CtlConn) -> None:
        """One sender's connection: hand out the cache, then claims and completions, until it closes.

        Claims still open when the connection ends are left to lapse at their deadlines: the sender may
        still be writing (its kernels outlive its socket), so only time makes the blocks safe again.
        """
        tickets: dict[int, tuple[str, _Expected]] = {}
        claimed: dict[int, float] = {}  # when each claim came (trace)
        event: torch.cuda.Event | None = None  # the sender's, recorded after each transfer's copies
        while True:
            try:
                msg = conn.recv(None)
            except TransportError:
                return
            op, seq = msg["op"], msg.get("seq")
            if op == "pair":
                event = torch.cuda.Event.from_ipc_handle(self.cache.device, bytes.fromhex(msg["event"]))
                conn.send(self._export)
            elif op == "claim":
                rid, dst, seen = str(msg["rid"]), [int(b) for b in msg["dst"]], time.monotonic()
                try:
                    tickets[seq] = (rid, self._claim(rid, len(dst), dst, float(msg["timeout"]) + self._grace))
                    claimed[seq] = seen
                except TransportRejected as e:
                    conn.send({"seq": seq, "status": "rejected", "error": str(e)})
                    continue
                conn.send({"seq": seq, "status": "go"})
            elif op == "done":
                rx = {"begin": claimed.pop(seq, 0.0), "end": time.monotonic()}  # monotonic times (trace)
                rid, ticket = tickets.pop(seq, (str(msg["rid"]), None))
                ok, error = bool(msg["ok"]), msg.get("error")
                if ok and ticket is not None and event is not None:
                    try:  # the copies were enqueued before "done" was sent; they take about a ms
                        wait_event(event, ticket.write_deadline, max_gap_s=_DONE_POLL_S)
                    except (TransportError, RuntimeError) as e:  # late, or a CUDA error (the sender died)
                        ok, error = False, f"the sender's copies did not complete: {e}"
                rx["data"] = time.monotonic()
                current = ticket is not None and self._finish(rid, ticket, ok, error)
                rx["reply"] = time.monotonic()
                conn.send({"seq": seq, "status": "ok" if current else "late", "rx": rx,
                           "error": None if current else "the claim lapsed before the write ended"})

    # --- sender -------------------------------------------------------------------------------------
    def _connect(self, endpoint: str, deadline: float) -> _IpcLink:
        cupy = _cupy()
        ctl = CtlConn.connect(endpoint, self._left(deadline), self.secret)
        with torch.cuda.device(self._dev):
            event = torch.cuda.Event(interprocess=True)
            handle = event.ipc_handle()
        try:
            ctl.send({"op": "pair", "event": handle.hex()})
            try:
                meta = ctl.recv(self._left(deadline))
            except TimeoutError:
                raise TransportError(f"KV receiver {endpoint} did not answer the pairing") from None
            shape, dtype = tuple(meta["shape"]), meta["dtype"]
            mine = tuple(self.cache.shape)
            if dtype != str(self.layout.dtype) or shape[:2] + shape[3:] != mine[:2] + mine[3:]:
                raise TransportError(f"KV receiver {endpoint} has cache {shape}/{dtype}, sender "
                                     f"{mine}/{self.layout.dtype}")
            nbytes = self.cache.element_size()
            for s in shape:
                nbytes *= s
            with cupy.cuda.Device(self._dev):
                base = cupy.cuda.runtime.ipcOpenMemHandle(bytes.fromhex(meta["handle"]),
                                                          _IPC_LAZY_ENABLE_PEER_ACCESS)
                mem = cupy.cuda.UnownedMemory(base + int(meta["offset"]), nbytes, ctl, self._dev)
                flat = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        except BaseException:
            ctl.close()
            raise
        peer = torch.from_dlpack(flat).view(self.layout.dtype).view(shape)
        return _IpcLink(ctl=ctl, peer_ptr=base, peer_cache=peer, stream=self.side_stream(), event=event)

    def _close_link(self, link: Link, polite: bool) -> None:
        """Unmap the peer's cache (once our copies are done) and drop the control connection."""
        assert isinstance(link, _IpcLink)
        if link.stream is not None:
            with contextlib.suppress(Exception):
                wait_stream(link.stream, time.monotonic() + 5.0)
        link.peer_cache = None
        if link.peer_ptr:
            with contextlib.suppress(Exception):
                cupy = _cupy()
                with cupy.cuda.Device(self._dev):
                    cupy.cuda.runtime.ipcCloseMemHandle(link.peer_ptr)
            link.peer_ptr = 0
        link.ctl.close()
