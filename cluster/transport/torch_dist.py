""""gloo" and "nccl": one implementation over torch.distributed point-to-point, backend picked by name.

No global world and no `init_process_group`: every (sender, receiver) pair gets its own 2-rank process
group, built directly (`ProcessGroupGloo` / `ProcessGroupNCCL`) on a `PrefixStore` of a TCPStore the
receiver hosts, so one process can pair with any number of peers, at any time, without restarts.

Wire protocol (receiver = rank 1 of each pair, sender = rank 0); control messages go over the pair's
socket (`_sock_ctl`), data over the process group:
  pairing   sender connects: {"op": "pair", "timeout"} -> {"pair", "store_port"}; both build the group on
            PrefixStore(f"pg/{pair}/") and exchange one element, so NCCL's communicator exists before any
            prefill streams into it. The receiver serves each connection on its own thread.
  transfer  {"op": "begin", "seq", "rid", "dst", "dtype", "block", "timeout"}, then per chunk of layers
            {"op": "chunk", "seq", "lo", "hi", "numel"} followed by ONE send of those layers of the blocks
            (gathered: [hi - lo, 2, n, block, heads, dim]); {"op": "end", "seq"} right behind the last
            chunk (or "abort" instead) -> {"seq", "status": "ok" | "rejected" | "aborted" | "late", "error"}.
            Transfers may interleave by chunk. The receiver claims the blocks at "begin"; each chunk is
            received on a stream of its own and scattered into the cache right behind it (GPU-side, no
            CPU wait); on CUDA a completer thread answers "end" once the data is in, so a streaming
            prefill usually has its answer before its forward ends. Data for a rejected request is drained.
  teardown  {"op": "bye"}, or the connection closing; any failure drops the pair (and aborts its group).
gloo moves CPU tensors (a CUDA cache is staged through host memory); nccl keeps everything on the GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist

from cluster.engine.kv_layout import KVLayout
from cluster.transport._dist_receiver import DistReceiver, first_line, td
from cluster.transport._link import Link
from cluster.transport._paired import PairedSendStream, PairedTransport
from cluster.transport._sock_ctl import CtlConn
from cluster.transport._streams import device_ids
from cluster.transport.base import TransportError, TransportRejected, parse_endpoint

log = logging.getLogger(__name__)
T = TypeVar("T")

_NCCL_PG_TIMEOUT = timedelta(hours=1)  # the watchdog's; every wait we do has its own, shorter timeout


def _bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` on a helper thread; TransportError if it has not returned within `timeout_s` (for process
    group set-up, which can block on a peer that is alive but stuck; the abandoned call stays on its
    daemon thread and its group must not be used)."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="kv-bounded-call", daemon=True).start()
    if not done.wait(max(timeout_s, 0.0)):
        raise TransportError(f"{what}: no answer within {timeout_s:.3g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass(eq=False)
class _DistLink(Link):
    pg: Any = None
    stream: torch.cuda.Stream | None = None  # where the sender gathers and sends


class _DistSendStream(PairedSendStream):
    t: _TorchDistTransport
    link: _DistLink

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.src_idx: torch.Tensor | None = None
        self.bufs: list[torch.Tensor] = []  # gathered chunks, alive until the receiver has them

    def _begin(self, src: list[int]) -> None:
        lay = self.layout
        self.link.ctl.send({"op": "begin", "seq": self.seq, "rid": self.rid, "dst": self.dst, "dtype": str(lay.dtype),
                            "block": [lay.block_size, lay.num_kv_heads, lay.head_dim], "timeout": self.left()})

    def _send_layers(self, src: list[int], lo: int, hi: int) -> None:
        cache, link = self.t.cache, self.link
        numel = (hi - lo) * cache[0, 0, 0].numel() * 2 * len(src)
        link.ctl.send({"op": "chunk", "seq": self.seq, "lo": lo, "hi": hi, "numel": numel})
        if link.stream is None:  # gloo: synchronous, through host memory
            data = self.layout.gather(cache, src, (lo, hi)).reshape(-1).cpu()
            link.pg.send([data], 1, 0).wait(td(self.left()))
            return
        link.stream.wait_stream(torch.cuda.current_stream(cache.device))  # behind the layers' KV writes
        with torch.cuda.stream(link.stream):
            if self.src_idx is None:
                self.src_idx = device_ids(src, cache.device)
            self.bufs.append(self.layout.gather(cache, self.src_idx, (lo, hi)).view(-1))
            link.pg.send([self.bufs[-1]], 1, 0)

    def _all_sent(self) -> None:
        self.link.ctl.send({"op": "end", "seq": self.seq})
        self.ended = True

    def _reply(self, deadline: float) -> dict[str, Any]:
        try:
            return self.link.await_reply(self.seq, deadline)
        finally:
            self.bufs.clear()

    def _complete(self) -> dict[str, Any]:
        assert self.deadline is not None
        reply = self._reply(self.deadline)
        status, endpoint = reply.get("status"), self.pair.endpoint
        if status == "ok":
            return reply
        if status in ("rejected", "late"):
            raise TransportRejected(f"KV receiver {endpoint} dropped {self.rid!r}: {reply.get('error')}")
        raise TransportError(f"KV receiver {endpoint} failed {self.rid!r}: {reply.get('error')}")

    def _abort(self) -> None:
        self._locked(self.link.ctl.send, {"op": "abort", "seq": self.seq})
        self._reply(time.monotonic() + min(self.timeout_s, 5.0))


class _TorchDistTransport(DistReceiver, PairedTransport):
    backend: ClassVar[str]
    _stream_type = _DistSendStream
    # Streamed transfers in at most 4 chunks: the receiver posts each one from Python. Measured with the cap
    # (docs/benchmarks.md): idle 2K streamed exposure 2.5 -> 2.1 ms; under load it was the first of two fixes
    # (the second, the engine no longer reading results by a pageable copy, is what brought the receiver back
    # to ~1 ms a transfer; the cap alone was not re-measured after it). Plain sends keep their 128 MiB chunks:
    # there the gather/send/scatter pipeline pays (8K: 4.9 ms in 8 chunks, 5.6 ms in 4).
    max_stream_chunks = 4

    def __init__(self, layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1",
                 recv_grace_s: float = 5.0, **kw: Any) -> None:
        super().__init__(layout, cache, host=host, **kw)
        self._cuda = self.backend == "nccl"
        self._recv_grace_s = recv_grace_s
        self._store: dist.TCPStore | None = None
        self._pair_ids = itertools.count(1)
        self._aborts: list[threading.Thread] = []

    # --- process groups -----------------------------------------------------------------------------
    def _new_pg(self, store: dist.Store, pair: int, rank: int, timeout_s: float) -> Any:
        prefixed = dist.PrefixStore(f"pg/{pair}/", store)
        if self.backend == "gloo":  # its pair sockets on `host`, not on the interface of the host's name
            gloo = dist.ProcessGroupGloo._Options()
            gloo._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
            gloo._timeout = td(timeout_s)
            return dist.ProcessGroupGloo(prefixed, rank, 2, gloo)
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = self.high_priority
        opts._timeout = _NCCL_PG_TIMEOUT
        return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)

    def _join(self, host: str, port: int, pair: int, rank: int, timeout_s: float) -> Any:
        """Build the pair's group and exchange one element (creates NCCL's communicator now)."""

        def join() -> Any:
            if self._cuda:
                torch.cuda.set_device(self.cache.device)
            store = dist.TCPStore(host, port, is_master=False, timeout=td(timeout_s))
            pg = self._new_pg(store, pair, rank, timeout_s)
            one = torch.zeros(1, device=self.cache.device if self._cuda else "cpu")
            work = pg.send([one], 1, 0) if rank == 0 else pg.recv([one], 0, 0)
            if self._cuda:
                work.wait()
                torch.cuda.current_stream().synchronize()
            else:
                work.wait(td(timeout_s))
            return pg

        return _bounded(join, timeout_s, f"KV pair {pair}: joining the process group")

    def _drop_pg(self, pg: Any, wait_s: float) -> None:
        """Abort (and release) a process group on a helper thread, waiting for it at most `wait_s`: after a
        failure, abort may hang on a stuck peer; on close we wait, so no C++ teardown races interpreter exit.
        """
        if pg is None:
            return

        def abort() -> None:
            with contextlib.suppress(Exception):
                pg.abort()  # NCCL: frees the communicator, ends its watchdog's interest in pending work

        t = threading.Thread(target=abort, name="kv-pg-abort", daemon=True)
        t.start()
        t.join(wait_s)
        if t.is_alive():
            with self._lock:  # close() waits for these
                self._aborts = [a for a in self._aborts if a.is_alive()] + [t]

    # --- receiver -----------------------------------------------------------------------------------
    def _prepare_listen(self) -> None:
        """Host the TCPStore the pairs' process groups meet on, on `host` only: the store is handed a socket
        bound there (by itself, it would listen on every interface)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.create_server((self.host, 0), family=family, backlog=64) as sock:
            port, fd = sock.getsockname()[1], sock.detach()  # the store owns the socket from here on
        self._store = dist.TCPStore(self.host, port, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=60), master_listen_fd=fd)

    # --- sender -------------------------------------------------------------------------------------
    def _describe(self, e: BaseException) -> str:
        return first_line(e)

    def _connect(self, endpoint: str, deadline: float) -> _DistLink:
        ctl = CtlConn.connect(endpoint, self._left(deadline), self.secret)
        try:
            ctl.send({"op": "pair", "timeout": self._left(deadline)})
            try:
                meta = ctl.recv(self._left(deadline))
            except TimeoutError:
                raise TransportError(f"KV receiver {endpoint} did not answer the pairing") from None
            pg = self._join(parse_endpoint(endpoint)[0], int(meta["store_port"]), int(meta["pair"]), 0,
                            self._left(deadline))
        except BaseException:
            ctl.close()
            raise
        return _DistLink(ctl=ctl, pg=pg, stream=self.side_stream() if self._cuda else None)

    def _close_link(self, link: Link, polite: bool) -> None:
        assert isinstance(link, _DistLink)
        if polite:
            with contextlib.suppress(Exception):
                link.ctl.send({"op": "bye"})
        self._drop_pg(link.pg, wait_s=5.0 if polite else 0.0)
        link.ctl.close()

    def _after_close(self) -> None:
        with self._lock:
            aborts = list(self._aborts)
        deadline = time.monotonic() + 10.0
        for t in aborts:  # process groups are released before the caller exits
            t.join(max(deadline - time.monotonic(), 0.0))
        self._store = None


class GlooTransport(_TorchDistTransport):
    """torch.distributed over gloo (TCP): CPU wire tensors; works between any two hosts."""

    name = "gloo"
    backend = "gloo"
    streams_layers = False  # a gloo send blocks until received: it must not run inside the forward


class NcclTransport(_TorchDistTransport):
    """torch.distributed over NCCL: both caches on CUDA; the gather/scatter stay on the GPU."""

    name = "nccl"
    backend = "nccl"

    def __init__(self, layout: KVLayout, cache: torch.Tensor, **kw: Any) -> None:
        if cache.device.type != "cuda":
            raise ValueError("the nccl transport needs a CUDA KV cache")
        if not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL")
        super().__init__(layout, cache, **kw)
