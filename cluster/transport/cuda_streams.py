"""CUDA stream helpers of the KV transports: a high-priority stream of their own, waiting on a stream with a
deadline, block ids onto the GPU without a CPU stall."""

from __future__ import annotations

import time

import torch

from cluster.transport.api import TransportError

_POLL_MIN_S, _POLL_MAX_S = 2e-5, 2e-4  # poll gaps back off: a long wait must not keep taking the GIL


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream for a transport's copies, sends and receives, at high priority: they use few SMs but must
    not queue behind a prefill's (or a decode step's) kernels, or the transfer lags the compute it should
    hide behind."""
    return torch.cuda.Stream(device, priority=-1)


def wait_event(event: torch.cuda.Event, deadline: float, max_gap_s: float = _POLL_MAX_S) -> None:
    """Block until `event` has completed; TransportError at `deadline`. Polls (a CUDA wait has no timeout)
    with gaps growing from 20 us to `max_gap_s` (0.2 ms: a wait of tens of ms costs the engine thread
    little GIL; a wait known to be short may poll finer)."""
    gap = _POLL_MIN_S
    while not event.query():
        if time.monotonic() > deadline:
            raise TransportError("KV data did not arrive in time")
        time.sleep(gap)
        gap = min(gap * 2, max_gap_s)


def wait_stream(stream: torch.cuda.Stream, deadline: float) -> None:
    """Block until the work enqueued on `stream` so far is done; TransportError at `deadline`."""
    event = torch.cuda.Event()
    event.record(stream)
    wait_event(event, deadline)


def drain(stream: torch.cuda.Stream) -> None:
    """Block until the work enqueued on `stream` so far is done, with the GIL released while waiting (no
    polling: the engine thread keeps the interpreter). Only for work that always ends on its own (local and
    peer copies), never for a receive that waits on another process: that needs `wait_stream`'s deadline."""
    event = torch.cuda.Event()
    event.record(stream)
    event.synchronize()


def device_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as an int64 tensor on `device`, copied on the current stream WITHOUT blocking the CPU (a
    pageable copy would wait for the stream to drain: mid-forward, that stalls the model's launches)."""
    host = torch.tensor(ids, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
