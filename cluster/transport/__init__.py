"""KV transports: move a request's KV blocks from a prefill worker's cache into a decode worker's cache.

Each transport has a sending and a receiving half (`api.KVSender`, `api.KVReceiver`), registered by name and
imported lazily, so importing this package pulls in neither cupy nor grpc:

    "gloo"      torch.distributed p2p over TCP (CPU tensors; CUDA caches are staged through host memory)
    "nccl"      torch.distributed p2p over NCCL (both caches on CUDA; any hosts NCCL can reach)
    "cuda_ipc"  same-host GPU to GPU: the sender writes straight into the receiver's cache (CUDA IPC)
    "grpc"      a client-streaming gRPC call carrying raw bytes (works anywhere; the slow fallback)

    sender = create_sender("gloo", layout, cache, host=..., secret=...)
    receiver = create_receiver("gloo", layout, cache, host=..., secret=...)
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import torch

from cluster.engine.kv_layout import KVLayout
from cluster.transport.api import KVReceiver, KVSender, KVSendStream, TransportError, TransportRejected

__all__ = ["KVReceiver", "KVSendStream", "KVSender", "TransportError", "TransportRejected", "create_receiver",
           "create_sender", "transport_names"]


class _Halves(NamedTuple):
    """Where a transport's halves live (each module has `open_sender` / `open_receiver`) and what they are
    always given."""

    sender: str
    receiver: str
    fixed: dict[str, Any]


_REGISTRY: dict[str, _Halves] = {
    "gloo": _Halves("cluster.transport.dist_sender", "cluster.transport.dist_receiver", {"backend": "gloo"}),
    "nccl": _Halves("cluster.transport.dist_sender", "cluster.transport.dist_receiver", {"backend": "nccl"}),
    "cuda_ipc": _Halves("cluster.transport.ipc_sender", "cluster.transport.ipc_receiver", {}),
    "grpc": _Halves("cluster.transport.grpc_transport", "cluster.transport.grpc_transport", {}),
}


def transport_names() -> list[str]:
    """Names the factories accept ("auto" is resolved by the cluster: `ClusterConfig.resolved_transport`)."""
    return sorted(_REGISTRY)


def _halves(name: str) -> _Halves:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; known: {', '.join(transport_names())}") from None


def create_sender(name: str, layout: KVLayout, cache: torch.Tensor, **options: Any) -> KVSender:
    """The sending half of transport `name` over `cache` (the engine's whole paged cache). Options: `host`
    (this worker's reachable address), `secret` (the cluster's; authenticates every connection), `trace`
    (a `cluster.kv_trace.KVTrace`), and the transport's own (see its `open_sender`)."""
    halves = _halves(name)
    return importlib.import_module(halves.sender).open_sender(layout, cache, **halves.fixed, **options)


def create_receiver(name: str, layout: KVLayout, cache: torch.Tensor, **options: Any) -> KVReceiver:
    """The receiving half of transport `name`, writing into `cache`; options as `create_sender`'s (`host` is
    where `listen` binds and what its endpoint names)."""
    halves = _halves(name)
    return importlib.import_module(halves.receiver).open_receiver(layout, cache, **halves.fixed, **options)
