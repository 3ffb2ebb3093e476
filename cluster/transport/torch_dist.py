""""gloo" and "nccl": one implementation over torch.distributed point-to-point, backend picked by name.

No global world and no `init_process_group`: every (sender, receiver) pair gets its own 2-rank process
group, built directly (`ProcessGroupGloo` / `ProcessGroupNCCL`) on a `PrefixStore` of the receiver's
TCPStore, so one process can pair with any number of peers, at any time, without restarts.

Wire protocol (receiver = rank 1 of each pair, sender = rank 0):
  pairing   sender: pair = store.add("pair_counter", 1); push ctl {"op": "pair", "pair", "timeout"};
            both sides build the process group on PrefixStore(f"pg/{pair}/", store) (it blocks until
            both have joined). The receiver serves each pair on its own thread.
  transfer  sender (one at a time per pair): push ctl {"op": "kv", "pair", "seq", "rid", "dst", "dtype",
            "shape", "timeout"}; then ONE send of the gathered blocks (shape [L, 2, n, block, heads, dim]);
            then wait for {"seq", "status": "ok" | "rejected" | "error", "error"} on reply/{pair}.
            The receiver receives into a scratch buffer, then (`_claim`, under the lock) scatters it into
            its cache only if the request is still expected, then replies. Rejected data is discarded.
  teardown  sender close(): push ctl {"op": "bye"}; any failure drops the pair and the next send pairs
            again (a fresh pair id). Control messages travel through the store, so an idle receiver never
            sits in a process-group recv (an idle NCCL recv would trip the NCCL watchdog).
gloo moves CPU tensors (a CUDA cache is staged through host memory); nccl keeps everything on the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from cluster.engine.kv_layout import KVLayout
from cluster.transport._paired import OutPair, PairedTransport
from cluster.transport._store_ctl import StoreClient, StoreServer, bounded
from cluster.transport.base import TransportError, TransportRejected

log = logging.getLogger(__name__)

_NCCL_PG_TIMEOUT = timedelta(hours=1)  # the watchdog's; every wait we do has its own, shorter timeout
_MAX_SCATTER_S = 60.0  # forget() waits at most this long for a scatter in progress
_DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8,
                               torch.int8, torch.int16, torch.int32, torch.int64)}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES.update({str(t): t for t in (torch.float8_e4m3fn, torch.float8_e5m2)})


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=max(seconds, 0.001))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


@dataclass
class _OutPair(OutPair):
    pg: Any = None


class _TorchDistTransport(PairedTransport):
    backend: ClassVar[str]
    _pair_type = _OutPair

    def __init__(self, layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1",
                 recv_grace_s: float = 5.0) -> None:
        super().__init__(layout, cache, host=host)
        self._wire = torch.device("cpu") if self.backend == "gloo" else cache.device
        self._recv_grace_s = recv_grace_s
        self._server: StoreServer | None = None
        self._in: dict[int, tuple[queue.Queue[dict[str, Any] | None], threading.Thread]] = {}
        self._aborts: list[threading.Thread] = []

    # --- process groups -----------------------------------------------------------------------------
    def _new_pg(self, store: dist.Store, pair: int, rank: int, timeout_s: float) -> Any:
        prefixed = dist.PrefixStore(f"pg/{pair}/", store)
        if self.backend == "gloo":
            return dist.ProcessGroupGloo(prefixed, rank, 2, _td(timeout_s))
        return dist.ProcessGroupNCCL(prefixed, rank, 2, _NCCL_PG_TIMEOUT)

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

    def _sync(self) -> None:
        if self.cache.device.type == "cuda":
            torch.cuda.current_stream(self.cache.device).synchronize()

    # --- receiver -----------------------------------------------------------------------------------
    def listen(self) -> str:
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            if self._server is None:
                self._server = StoreServer(self.host, self._on_ctl, name=f"kv-{self.backend}")
            return self._server.endpoint

    def _on_ctl(self, msg: dict[str, Any]) -> None:
        """Dispatcher thread: route a control message to its pair's thread (never blocks)."""
        pair, op = int(msg["pair"]), msg["op"]
        with self._lock:
            q, server = self._in.get(pair, (None, None))[0], self._server
            if server is None:
                return
            if op == "pair" and q is None:
                q = queue.Queue()
                t = threading.Thread(target=self._serve_pair, args=(server, pair, q, float(msg["timeout"])),
                                     name=f"kv-{self.backend}-pair{pair}", daemon=True)
                self._in[pair] = (q, t)
                t.start()
                return
        if q is not None:
            q.put(None if op == "bye" else msg)
        elif op == "kv":
            server.reply(pair, {"seq": msg["seq"], "status": "error", "error": "unknown pair"})

    def _serve_pair(self, server: StoreServer, pair: int, q: queue.Queue[dict[str, Any] | None],
                    timeout_s: float) -> None:
        pg = None
        try:
            if self.cache.device.type == "cuda":
                torch.cuda.set_device(self.cache.device)
            pg = self._new_pg(server.client(_td(timeout_s)), pair, 1, timeout_s)
            while (msg := q.get()) is not None:
                self._receive_one(server, pg, pair, msg)
        except Exception as e:
            log.warning("KV %s pair %d closed: %s", self.backend, pair, _first_line(e))
        finally:
            with self._lock:
                self._in.pop(pair, None)
            self._drop_pg(pg, wait_s=5.0)

    def _receive_one(self, server: StoreServer, pg: Any, pair: int, msg: dict[str, Any]) -> None:
        """Receive one transfer; raises (ending the pair) only if the process group broke."""
        rid, dst, seq = str(msg["rid"]), [int(b) for b in msg["dst"]], msg["seq"]
        shape, dtype = tuple(int(s) for s in msg["shape"]), _DTYPES.get(msg["dtype"])
        if dtype is None:
            raise TransportError(f"pair {pair}: unsupported dtype {msg['dtype']!r}; cannot stay in sync")
        buf = None
        if dst:
            buf = torch.empty(shape, dtype=dtype, device=self._wire)
            pg.recv([buf], 0, 0).wait(_td(float(msg["timeout"]) + self._recv_grace_s))
        try:
            if buf is not None and (dtype != self.layout.dtype or shape != self.layout.cache_shape(len(dst))):
                raise TransportRejected(f"layout mismatch: got {shape}/{dtype}, expected "
                                        f"{self.layout.cache_shape(len(dst))}/{self.layout.dtype}")
            ticket = self._claim(rid, len(dst), dst, _MAX_SCATTER_S)
        except TransportRejected as e:
            server.reply(pair, {"seq": seq, "status": "rejected", "error": str(e)})
            return
        try:
            if buf is not None:
                self.layout.scatter(self.cache, ticket.dst_block_ids, buf)
                self._sync()
        except Exception as e:
            self._finish(rid, ticket, False, _first_line(e))
            server.reply(pair, {"seq": seq, "status": "error", "error": _first_line(e)})
            return
        self._finish(rid, ticket, True)
        server.reply(pair, {"seq": seq, "status": "ok"})

    # --- sender -------------------------------------------------------------------------------------
    def _describe(self, e: Exception) -> str:
        return _first_line(e)

    def _connect(self, pair: _OutPair, deadline: float) -> None:
        pair.ctl = ctl = StoreClient(pair.endpoint, self._left(deadline))
        ctl.push({"op": "pair", "timeout": self._left(deadline)}, self._left(deadline))
        left = self._left(deadline)
        pair.pg = bounded(lambda: self._new_pg(ctl.store.clone(), ctl.pair, 0, left), left,
                          f"KV receiver {pair.endpoint}: joining the process group")

    def _transfer(self, pair: _OutPair, rid: str, src: list[int], dst: list[int], deadline: float) -> None:
        if pair.pg is None:
            self._connect(pair, deadline)
        assert pair.ctl is not None
        pair.seq += 1
        data = self.layout.gather(self.cache, src).to(self._wire) if src else None
        pair.ctl.push({"op": "kv", "seq": pair.seq, "rid": rid, "dst": list(dst), "dtype": str(self.layout.dtype),
                       "shape": list(data.shape) if data is not None else [], "timeout": self._left(deadline)},
                      self._left(deadline))
        if data is not None:
            pair.pg.send([data], 1, 0).wait(_td(self._left(deadline)))
        reply = pair.ctl.wait_reply(self._left(deadline))
        if reply.get("seq") != pair.seq:
            raise TransportError(f"KV receiver {pair.endpoint} answered seq {reply.get('seq')}, sent {pair.seq}")
        if reply["status"] == "rejected":
            raise TransportRejected(f"KV receiver {pair.endpoint} dropped {rid!r}: {reply.get('error')}")
        if reply["status"] != "ok":
            raise TransportError(f"KV receiver {pair.endpoint} failed {rid!r}: {reply.get('error')}")

    def _disconnect(self, pair: _OutPair, polite: bool = False) -> None:
        """Forget a (possibly broken) pair; the next send pairs afresh. Caller holds pair.lock.

        `polite` (clean close only) tells the receiver, so its pair thread ends. After a failure the
        receiver's pair thread ends when its pending receive fails or times out; if it was idle, it
        idles on (one thread and one process group) until the receiver closes.
        """
        if polite and pair.ctl is not None and pair.pg is not None:
            with contextlib.suppress(Exception):
                pair.ctl.push({"op": "bye"}, 1.0)
        self._drop_pg(pair.pg, wait_s=5.0 if polite else 0.0)
        pair.pg = pair.ctl = None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            server, self._server = self._server, None
            pairs, serving = list(self._out.values()), list(self._in.values())
        self._disconnect_pairs(pairs, polite=True)
        for q, _ in serving:
            q.put(None)
        deadline = time.monotonic() + 10.0
        with self._lock:
            aborts = list(self._aborts)
        for t in [t for _, t in serving] + aborts:  # process groups are released before the caller exits
            t.join(max(deadline - time.monotonic(), 0.0))
        if server is not None:
            server.close()


class GlooTransport(_TorchDistTransport):
    """torch.distributed over gloo (TCP): CPU wire tensors; works between any two hosts."""

    name = "gloo"
    backend = "gloo"


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
