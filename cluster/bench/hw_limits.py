"""Hardware limits measured in the same process as the benchmark: memory bandwidth and matmul rate.

- bandwidth: a large device-to-device copy (`dst.copy_(src)`), counted as bytes read + bytes written;
- matmul: a square `torch.matmul` in the benchmark dtype, 2 * n^3 floating point operations.
Both report the median of several timed repeats after warm-up runs.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cluster.bench.report import DeviceTimer


@dataclass(frozen=True)
class HardwareLimits:
    bandwidth_bytes_per_s: float
    copy_bytes: int  # size of one of the two tensors
    matmul_flops_per_s: float
    matmul_n: int
    matmul_dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bandwidth_gb_per_s": self.bandwidth_bytes_per_s / 1e9,
                "matmul_tflops": self.matmul_flops_per_s / 1e12}


def default_sizes(device: str) -> tuple[int, int]:
    """(copy bytes, matmul n): 2 GiB and 8192 on GPUs; small enough to run quickly on CPU."""
    return (2 * 2**30, 8192) if device.startswith("cuda") else (64 * 2**20, 512)


def measure_bandwidth(device: str, nbytes: int, repeats: int = 10, warmup: int = 3) -> float:
    """Bytes per second moved by a device-to-device copy of `nbytes` (read + write counted)."""
    n = max(nbytes // 2, 1)  # int16 elements
    src = torch.ones(n, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    timer = DeviceTimer(device)
    for _ in range(warmup):
        dst.copy_(src)
    times = [timer.time(lambda: dst.copy_(src))[1] for _ in range(repeats)]
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def measure_matmul(device: str, n: int, dtype: torch.dtype, repeats: int = 10, warmup: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timer = DeviceTimer(device)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    times = [timer.time(lambda: torch.matmul(a, b, out=out))[1] for _ in range(repeats)]
    return 2 * n**3 / statistics.median(times)


def measure(device: str, dtype: torch.dtype, copy_bytes: int | None = None, matmul_n: int | None = None,
            repeats: int = 10) -> HardwareLimits:
    """Both limits; sizes default to `default_sizes(device)`."""
    dflt_bytes, dflt_n = default_sizes(device)
    copy_bytes = copy_bytes or dflt_bytes
    matmul_n = matmul_n or dflt_n
    with torch.inference_mode():
        bw = measure_bandwidth(device, copy_bytes, repeats)
        _free(device)  # the copy's tensors are gone with its frame
        flops = measure_matmul(device, matmul_n, dtype, repeats)
        _free(device)
    return HardwareLimits(bw, copy_bytes, flops, matmul_n, str(dtype).removeprefix("torch."))


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
