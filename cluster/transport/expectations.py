"""A receiver's bookkeeping of the requests whose KV it expects: one `Expectations` per receiver, shared by
the caller's threads (expect / wait / forget) and the threads that write into the cache (claim / finish).

Per request id, all under one lock:

    expect() -> EXPECTED --claim()--> WRITING --finish(ok)--> LANDED --wait()/poll()--> gone
                                               \\--finish(fail)--> EXPECTED (a retry may land later)
    forget(): EXPECTED/LANDED -> gone at once; WRITING -> waits until the write ends (or its deadline)

`forget()` never returns while a write into the request's blocks may still be under way, so after it returns
the caller may hand the blocks to another request. Writers `claim()` just before writing into the cache and
`finish()` right after (the write complete, also on the GPU).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from cluster.transport.api import TransportRejected


@dataclass(eq=False)
class WriteTicket:
    """One request's expectation; a writer holds it from `claim` to `finish`."""

    dst_block_ids: list[int]
    state: str = "expected"  # "expected" | "writing" | "landed"
    write_deadline: float = 0.0  # monotonic; a writer that has not finished by then is presumed dead
    error: str | None = None  # why the last write failed (for wait's message)


class Expectations:
    """Which requests may be written into which blocks, and which have landed."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._expected: dict[str, WriteTicket] = {}

    # --- the caller's side ------------------------------------------------------------------------------
    def expect(self, request_id: str, dst_block_ids: list[int]) -> None:
        with self._cv:
            cur = self._expected.get(request_id)
            if cur is not None and cur.state == "writing":
                raise ValueError(f"request {request_id!r} is being written; forget() it first")
            self._expected[request_id] = WriteTicket(list(dst_block_ids))

    def wait(self, request_id: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                exp = self._expected.get(request_id)
                if exp is None:
                    raise KeyError(f"request {request_id!r} is not expected by this receiver")
                if exp.state == "landed":
                    del self._expected[request_id]
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f" (last attempt failed: {exp.error})" if exp.error else ""
                    raise TimeoutError(f"KV for {request_id!r} did not arrive within {timeout_s:.3g}s{why}")
                self._cv.wait(left)

    def poll(self) -> list[str]:
        with self._cv:
            done = [rid for rid, e in self._expected.items() if e.state == "landed"]
            for rid in done:
                del self._expected[rid]
            return done

    def forget(self, request_id: str) -> None:
        with self._cv:
            while True:
                exp = self._expected.get(request_id)
                if exp is None:
                    return
                left = exp.write_deadline - time.monotonic()
                if exp.state != "writing" or left <= 0:
                    del self._expected[request_id]
                    self._cv.notify_all()
                    return
                self._cv.wait(left)

    # --- the writers' side ------------------------------------------------------------------------------
    def expects(self, request_id: str) -> bool:
        """Whether `request_id` is expected at all (an early drop before reading its data; `claim` decides)."""
        with self._cv:
            return request_id in self._expected

    def claim(self, request_id: str, num_blocks: int, dst_block_ids: list[int] | None,
              max_write_s: float) -> WriteTicket:
        """The right to write `request_id`'s blocks until `finish` (or `max_write_s`); `ticket.dst_block_ids`
        are the receiver's destination ids (authoritative). TransportRejected when the id is not expected,
        already landed, being written by someone else, or the sender's destination disagrees with the
        reservation."""
        with self._cv:
            exp = self._expected.get(request_id)
            if exp is None:
                raise TransportRejected(f"receiver does not expect request {request_id!r} (forgotten?)")
            if exp.state != "expected":
                raise TransportRejected(f"request {request_id!r} is already {exp.state} on the receiver")
            if num_blocks != len(exp.dst_block_ids) or (
                    dst_block_ids is not None and list(dst_block_ids) != exp.dst_block_ids):
                raise TransportRejected(
                    f"request {request_id!r}: sender has {num_blocks} blocks for {dst_block_ids}, receiver "
                    f"reserved {exp.dst_block_ids}")
            exp.state = "writing"
            exp.write_deadline = time.monotonic() + max_write_s
            return exp

    def finish(self, request_id: str, ticket: WriteTicket, ok: bool, error: str | None = None) -> bool:
        """End a write started by `claim`: LANDED on success, back to EXPECTED on failure. False (and nothing
        changed) when the claim had lapsed: the request was forgotten after the claim's deadline passed (and
        perhaps expected again) while the writer was still busy."""
        with self._cv:
            current = self._expected.get(request_id) is ticket and ticket.state == "writing"
            if current:
                ticket.state = "landed" if ok else "expected"
                ticket.error = None if ok else error
            self._cv.notify_all()
            return current
