"""The 2-rank process groups of "nccl"/"gloo", one per (sender, receiver) pair (receiver = rank 1).

No global world and no `init_process_group`: every pair's group is built directly (`ProcessGroupGloo` /
`ProcessGroupNCCL`) on a `PrefixStore(f"pg/{pair}/")` of a TCPStore the receiver hosts, so one process can
pair with any number of peers, at any time, without restarts. Both ends exchange one element when they join,
so NCCL's communicator exists before any prefill streams into it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cluster.transport.api import TransportError

T = TypeVar("T")
_NCCL_PG_TIMEOUT = timedelta(hours=1)  # the watchdog's; every wait we do has its own, shorter timeout


def td(seconds: float) -> timedelta:
    return timedelta(seconds=max(seconds, 0.001))


def host_store(host: str) -> dist.TCPStore:
    """The TCPStore the pairs' groups meet on, listening on `host` only: the store is handed a socket bound
    there (by itself, it would listen on every interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family, backlog=64) as sock:
        port, fd = sock.getsockname()[1], sock.detach()  # the store owns the socket from here on
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60),
                         master_listen_fd=fd)


def _bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` on a helper thread; TransportError if it has not returned within `timeout_s` (for group
    set-up, which can block on a peer that is alive but stuck; the abandoned call stays on its daemon thread
    and its group must not be used)."""
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


class PairGroups:
    """Builds and tears down one end's pair groups over `device` (the cache's)."""

    def __init__(self, backend: str, host: str, device: torch.device) -> None:
        self.backend = backend
        self.cuda = backend == "nccl"
        self._host = host
        self._device = device
        self._lock = threading.Lock()
        self._aborts: list[threading.Thread] = []

    def _new_pg(self, store: dist.Store, pair: int, rank: int, timeout_s: float) -> Any:
        prefixed = dist.PrefixStore(f"pg/{pair}/", store)
        if not self.cuda:  # its pair sockets on `host`, not on the interface of the host's name
            gloo = dist.ProcessGroupGloo._Options()
            gloo._devices = [dist.ProcessGroupGloo.create_device(hostname=self._host)]
            gloo._timeout = td(timeout_s)
            return dist.ProcessGroupGloo(prefixed, rank, 2, gloo)
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = True  # as the transports' own streams (cuda_streams.side_stream)
        opts._timeout = _NCCL_PG_TIMEOUT
        return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)

    def join(self, store_host: str, port: int, pair: int, rank: int, timeout_s: float) -> Any:
        """Build pair `pair`'s group on the store at `store_host:port` and exchange one element."""

        def join() -> Any:
            if self.cuda:
                torch.cuda.set_device(self._device)
            store = dist.TCPStore(store_host, port, is_master=False, timeout=td(timeout_s))
            pg = self._new_pg(store, pair, rank, timeout_s)
            one = torch.zeros(1, device=self._device if self.cuda else "cpu")
            work = pg.send([one], 1, 0) if rank == 0 else pg.recv([one], 0, 0)
            if self.cuda:
                work.wait()
                torch.cuda.current_stream().synchronize()
            else:
                work.wait(td(timeout_s))
            return pg

        return _bounded(join, timeout_s, f"KV pair {pair}: joining the process group")

    def drop(self, pg: Any, wait_s: float) -> None:
        """Abort (and release) a group on a helper thread, waiting for it at most `wait_s`: after a failure,
        abort may hang on a stuck peer; on close we wait, so no C++ teardown races interpreter exit."""
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

    def close(self) -> None:
        """Wait (up to 10 s) for the aborts still running: the groups are released before the caller exits."""
        with self._lock:
            aborts = list(self._aborts)
        deadline = time.monotonic() + 10.0
        for t in aborts:
            t.join(max(deadline - time.monotonic(), 0.0))
