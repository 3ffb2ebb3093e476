"""KV transports: move a request's KV blocks from a prefill worker's cache into a decode worker's cache.

Implementations are registered by name and imported lazily, so importing this package pulls in neither
cupy nor grpc:

    "gloo"      torch.distributed p2p over TCP (CPU tensors; CUDA caches are staged through host memory)
    "nccl"      torch.distributed p2p over NCCL (both caches on CUDA; any hosts NCCL can reach)
    "cuda_ipc"  same-host GPU to GPU: the sender writes straight into the receiver's cache (CUDA IPC)
    "grpc"      a client-streaming gRPC call carrying raw bytes (works anywhere; the slow fallback)

    t = create_transport("gloo", layout, cache)
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from cluster.engine.kv_layout import KVLayout
from cluster.transport.base import KVTransport, TransportError, TransportRejected

__all__ = ["KVTransport", "TransportError", "TransportRejected", "create_transport",
           "transport_names"]

_REGISTRY: dict[str, tuple[str, str]] = {
    "gloo": ("cluster.transport.torch_dist", "GlooTransport"),
    "nccl": ("cluster.transport.torch_dist", "NcclTransport"),
    "cuda_ipc": ("cluster.transport.cuda_ipc", "CudaIpcTransport"),
    "grpc": ("cluster.transport.grpc_transport", "GrpcTransport"),
}


def transport_names() -> list[str]:
    """Names `create_transport` accepts ("auto" is resolved by the cluster: `ClusterConfig.resolved_transport`)."""
    return sorted(_REGISTRY)


def transport_class(name: str) -> type[KVTransport]:
    """Import (on first use) and return the class registered as `name`."""
    try:
        module, cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; known: {', '.join(transport_names())}") from None
    return getattr(importlib.import_module(module), cls)


def create_transport(name: str, layout: KVLayout, cache: torch.Tensor, **kw: Any) -> KVTransport:
    """Build the transport registered as `name` over `cache` (keyword args go to its constructor)."""
    return transport_class(name)(layout, cache, **kw)
