"""Between a request's responses (`Orchestrator.generate`) and the client that reads them.

The responses are taken as they come, by a task of their own (`Outbox.fill`): a request's workers and its
admission are done with it when it ends, not when its client has read it, so a client that reads slowly, or
never, holds nothing of the cluster's. What the client has not taken yet waits in the `Outbox`, merged: a
delta that arrives while the previous one still waits joins it, so one stream's backlog is at most one delta
(bounded by the request's max_tokens), its final and its end, whatever the client's pace. A slow reader
gets fewer, larger messages and loses nothing.

A write that the client's flow control holds up for `stream_idle_timeout_s` (an HTTP/2 window that stays
full, a TCP send buffer that does not drain) means the client is not reading: `write_or_idle` raises
`StreamIdle`, and the caller ends the stream and cancels the fill, which cancels the request on its workers
and frees its blocks at once. As nginx's `send_timeout`, the limit is between two successive writes, not on
the whole response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable

import grpc
from pdserve.v1 import generate_pb2 as pb

from router.errors import RouterError

log = logging.getLogger(__name__)

Item = pb.GenerateResponse | RouterError | None  # None: that stream ended
Entry = tuple[int, Item]  # (stream index, item)


class StreamIdle(Exception):
    """The client has not taken a write for `timeout_s` seconds."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the client did not read the stream for {timeout_s:g}s (stream_idle_timeout_s="
                         f"{timeout_s:g}): the router cancelled the request")
        self.reason = str(self)


class _Pending:
    """A waiting delta that later deltas join (texts joined once, when it is taken)."""

    def __init__(self, msg: pb.GenerateResponse) -> None:
        self.msg = msg
        self.texts = [msg.delta.text]

    def join(self, delta: pb.Delta) -> None:
        self.msg.delta.token_ids.extend(delta.token_ids)
        self.msg.delta.logprobs.extend(delta.logprobs)
        self.texts.append(delta.text)

    def done(self) -> None:
        if len(self.texts) > 1:
            self.msg.delta.text = "".join(self.texts)


class Outbox:
    """The responses of one or more streams (by index) that their client has not taken yet, in arrival
    order, each stream's waiting deltas merged into one."""

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._pending: dict[int, _Pending] = {}  # stream index -> its delta still waiting
        self._ready = asyncio.Event()

    def put(self, index: int, item: Item) -> None:
        if isinstance(item, pb.GenerateResponse) and item.HasField("delta"):
            pending = self._pending.get(index)
            if pending is not None:
                pending.join(item.delta)
                return
            self._pending[index] = _Pending(item)
        else:
            self._close_pending(index)  # nothing joins a delta across its stream's final or end
        self._entries.append((index, item))
        self._ready.set()

    def _close_pending(self, index: int) -> None:
        pending = self._pending.pop(index, None)
        if pending is not None:
            pending.done()

    async def take(self) -> list[Entry]:
        """Everything that has arrived since the last take (waits for at least one entry)."""
        while not self._entries:
            self._ready.clear()
            await self._ready.wait()
        for index in list(self._pending):
            self._close_pending(index)
        entries, self._entries = self._entries, []
        return entries

    async def put_next(self, index: int, responses: AsyncIterator[pb.GenerateResponse]) -> bool:
        """Put the next response of `responses` as stream `index`, or its end (None) or its RouterError; False
        once the stream is over (closing `responses` stays the caller's)."""
        try:
            msg = await anext(responses)
        except StopAsyncIteration:
            self.put(index, None)
            return False
        except RouterError as err:
            self.put(index, err)
            return False
        except Exception as exc:  # a bug: say so rather than leave the client waiting
            log.exception("stream %d failed", index)
            self.put(index, RouterError(grpc.StatusCode.INTERNAL, f"router error: {type(exc).__name__}: {exc}"))
            return False
        self.put(index, msg)
        return True

    async def fill(self, index: int, responses: AsyncIterator[pb.GenerateResponse]) -> None:
        """Put every response of `responses` as stream `index` (`put_next`) to its end; cancelling this closes
        `responses` (the orchestrator's cleanup runs)."""
        try:
            while await self.put_next(index, responses):
                pass
        finally:
            await responses.aclose()


async def write_or_idle(write: Awaitable[object], timeout_s: float) -> None:
    """Await one write to the client; `StreamIdle` if it has not completed after `timeout_s` seconds."""
    try:
        async with asyncio.timeout(timeout_s):
            await write
    except TimeoutError:
        raise StreamIdle(timeout_s) from None


async def stop_filling(task: asyncio.Task[None]) -> None:
    """Cancel a fill task and wait until its responses are closed (the request's cleanup started). A cancel
    can be lost on the way (Python 3.11's asyncio.wait_for drops one that lands as its awaitable completes),
    so it is repeated while the task runs on."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()
