"""CUDA IPC memory of "cuda_ipc": the receiver exports the allocation that holds its cache, the sender maps it.

PyTorch's caching allocator may have placed the cache inside a bigger cudaMalloc segment, so the receiver looks
up the segment's base with the driver's cuMemGetAddressRange (through ctypes on libcuda, so no cuda-python
dependency), exports `cudaIpcGetMemHandle(base)` and publishes `offset = cache.data_ptr() - base`. The sender
opens the handle once per receiver (lazy peer access) and wraps [base + offset, + cache bytes) as a tensor of
the cache's shape on its own device (cupy memory -> DLPack). Memory from `expandable_segments` (cuMem VMM)
cannot be exported this way: `export_cache` raises.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import torch

from cluster.transport.api import TransportError

_IPC_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


def cupy_module() -> Any:
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


@dataclass(frozen=True)
class ExportedCache:
    """What a sender needs to map the receiver's cache."""

    handle: bytes
    offset: int
    shape: tuple[int, ...]
    dtype: str


def export_cache(cache: torch.Tensor, device_index: int) -> ExportedCache:
    """The CUDA IPC handle of the allocation holding `cache`, and where in it the cache starts."""
    cupy = cupy_module()
    ptr, nbytes = cache.data_ptr(), cache.numel() * cache.element_size()
    try:
        with torch.cuda.device(device_index), cupy.cuda.Device(device_index):
            base, size = _segment_base(ptr)
            if not base <= ptr <= ptr + nbytes <= base + size:
                raise RuntimeError(f"cache [{ptr:#x}, +{nbytes}) outside [{base:#x}, +{size})")
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
    except Exception as e:  # e.g. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (cuMem VMM)
        raise TransportError(f"cannot export the KV cache for CUDA IPC: {e}") from e
    return ExportedCache(handle, ptr - base, tuple(cache.shape), str(cache.dtype))


def map_peer_cache(peer: ExportedCache, dtype: torch.dtype, device_index: int, owner: Any) -> tuple[torch.Tensor, int]:
    """(the peer's cache as a tensor on our device, the mapped base to `unmap`); `owner` is kept alive by the
    mapping's memory object."""
    cupy = cupy_module()
    nbytes = torch.empty(0, dtype=dtype).element_size() * math.prod(peer.shape)
    with cupy.cuda.Device(device_index):
        base = cupy.cuda.runtime.ipcOpenMemHandle(peer.handle, _IPC_LAZY_ENABLE_PEER_ACCESS)
        mem = cupy.cuda.UnownedMemory(base + peer.offset, nbytes, owner, device_index)
        flat = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
    return torch.from_dlpack(flat).view(dtype).view(peer.shape), base


def unmap(base: int, device_index: int) -> None:
    cupy = cupy_module()
    with cupy.cuda.Device(device_index):
        cupy.cuda.runtime.ipcCloseMemHandle(base)
