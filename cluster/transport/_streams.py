"""CUDA stream helpers of the KV transports: waiting on a stream with a deadline, ids onto the GPU."""

from __future__ import annotations

import time

import torch

from cluster.transport.base import TransportError


def wait_stream(stream: torch.cuda.Stream, deadline: float) -> None:
    """Block until the work enqueued on `stream` so far is done; TransportError at `deadline`."""
    event = torch.cuda.Event()
    event.record(stream)
    while not event.query():
        if time.monotonic() > deadline:
            raise TransportError("KV data did not arrive in time")
        time.sleep(2e-5)


def device_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as an int64 tensor on `device`, copied on the current stream WITHOUT blocking the CPU (a
    pageable copy would wait for the stream to drain: mid-forward, that stalls the model's launches)."""
    host = torch.tensor(ids, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
