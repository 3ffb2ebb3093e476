"""Sender side shared by the store-controlled transports ("gloo"/"nccl", "cuda_ipc"): one pair per endpoint.

A sender keeps one `OutPair` (control connection plus transport state) per receiver endpoint and runs
one transfer at a time on it. `PairedTransport.send` checks the arguments, finds or makes the pair, takes
its lock within the timeout and maps failures: those in `_keep_pair_on` leave the pair as it is (it is
still in step with the receiver); any other drops it (`_disconnect`, the next send pairs afresh) and
reaches the caller as a `TransportError`.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from cluster.engine.kv_layout import KVLayout
from cluster.transport._store_ctl import StoreClient
from cluster.transport.base import KVTransport, TransportError, TransportRejected


@dataclass
class OutPair:
    """Sender-side state of one receiver endpoint; `lock` serialises transfers on it."""

    endpoint: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    ctl: StoreClient | None = None
    seq: int = 0


class PairedTransport(KVTransport):
    """A transport whose sender runs its transfers over one `OutPair` per receiver endpoint."""

    _pair_type: ClassVar[type[OutPair]] = OutPair  # what a new endpoint's pair is made of
    _keep_pair_on: ClassVar[type[TransportError]] = TransportRejected  # failures that leave the pair usable

    def __init__(self, layout: KVLayout, cache: torch.Tensor, *, host: str = "127.0.0.1") -> None:
        super().__init__(layout, cache, host=host)
        self._lock = threading.Lock()
        self._out: dict[str, Any] = {}  # endpoint -> its `_pair_type`
        self._closed = False

    @abstractmethod
    def _transfer(self, pair: Any, rid: str, src: list[int], dst: list[int], deadline: float) -> None:
        """Move the blocks over `pair` (connecting it first if needed), by `deadline`. Caller holds pair.lock."""

    @abstractmethod
    def _disconnect(self, pair: Any) -> None:
        """Drop a (possibly broken) pair's connection. Caller holds pair.lock."""

    def _describe(self, e: Exception) -> str:
        """How an unexpected failure is worded in the TransportError that replaces it."""
        return str(e)

    def send(self, endpoint: str, request_id: str, src_block_ids: list[int], dst_block_ids: list[int],
             timeout_s: float) -> None:
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destinations")
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            pair = self._out.setdefault(endpoint, self._pair_type(endpoint))
        if not pair.lock.acquire(timeout=max(timeout_s, 0.0)):
            raise TransportError(f"timed out after {timeout_s:.3g}s waiting for other sends to {endpoint}")
        try:
            self._transfer(pair, request_id, src_block_ids, dst_block_ids, deadline)
        except self._keep_pair_on:
            raise
        except Exception as e:
            self._disconnect(pair)
            if isinstance(e, TransportError):
                raise
            raise TransportError(f"KV send of {request_id!r} to {endpoint} failed: {self._describe(e)}") from e
        finally:
            pair.lock.release()

    @staticmethod
    def _left(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportError("KV send timed out")
        return left

    def _disconnect_pairs(self, pairs: list[Any], **kw: Any) -> None:
        """On close: `_disconnect(pair, **kw)` each pair, waiting at most 5 s for a transfer on it to end."""
        for pair in pairs:
            if pair.lock.acquire(timeout=5.0):
                try:
                    self._disconnect(pair, **kw)
                finally:
                    pair.lock.release()
