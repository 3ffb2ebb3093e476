"""This router's output streams from workers: one long-lived `Attach` stream per worker, fanned out here.

A worker packs every engine step's new tokens of all the requests this router holds on it into one message;
the session's reader splits it by request into `RequestStream`s, which buffer until the request's relay
reads them (a slow client never holds up the worker's stream or another client; what accumulates is
bounded by the request's max_tokens). A stream that breaks fails every request it carried with UNAVAILABLE;
the next request to that worker attaches anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid

import grpc
from pdserve.v1 import worker_pb2 as wpb

from cluster.registry import WorkerInfo
from router.channels import WorkerChannels
from router.errors import RouterError

log = logging.getLogger(__name__)
Output = tuple[wpb.RequestOutput, float]  # (output, step_ms of the engine step that produced it)


class StreamStalled(RouterError):
    """A request's worker sent nothing for it within the timeout while its stream stayed up: the worker hangs
    (or is too far behind to be waited for), which `router.migration` treats as a lost worker."""


class RequestStream:
    """One request's outputs, in order, until its finish reason (or a failure)."""

    def __init__(self) -> None:
        self._items: list[Output] = []
        self._ready = asyncio.Event()
        self._error: RouterError | None = None

    def push(self, out: wpb.RequestOutput, step_ms: float) -> None:
        self._items.append((out, step_ms))
        self._ready.set()

    def fail(self, error: RouterError) -> None:
        self._error = error
        self._ready.set()

    async def read(self, timeout: float, step: str) -> list[Output]:
        """Every output that arrived since the last read (waits up to `timeout` s for one). RouterError
        DEADLINE_EXCEEDED (`StreamStalled`) if none comes in time, or the stream's failure."""
        if not self._items and self._error is None:
            try:  # not wait_for: on Python 3.11 it drops a cancel that lands as the event is set
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                raise StreamStalled(grpc.StatusCode.DEADLINE_EXCEEDED, f"{step}: no tokens for {timeout:g}s") from None
        self._ready.clear()
        items, self._items = self._items, []
        if not items and self._error is not None:
            raise self._error
        return items


class WorkerSession:
    """This router's Attach stream to one worker."""

    def __init__(self, channels: WorkerChannels, info: WorkerInfo, router_id: str) -> None:
        self.info = info
        self.router_id = router_id  # what the worker knows this stream by: requests for it name it
        self._call = channels.stub(info.address).Attach(wpb.AttachRequest(router_id=router_id))
        self._streams: dict[str, RequestStream] = {}
        self._reader: asyncio.Task[None] | None = None
        self.alive = True

    async def start(self, timeout: float) -> None:
        """Wait for the worker's first (empty) message: from then on, it routes this router's outputs here."""
        try:
            first = await asyncio.wait_for(self._call.read(), timeout)
        except (TimeoutError, grpc.aio.AioRpcError) as e:
            self._call.cancel()
            self.alive = False
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else f"no answer in {timeout:g}s"
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"attaching to worker {self.info.worker_id} "
                                                           f"({self.info.address}) failed: {detail}") from None
        if first is grpc.aio.EOF:
            self.alive = False
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"worker {self.info.worker_id} closed its stream")
        self._reader = asyncio.ensure_future(self._read())

    def open(self, request_id: str) -> RequestStream:
        stream = self._streams[request_id] = RequestStream()
        return stream

    def close(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def _read(self) -> None:
        reason = "stream ended"
        try:
            while (batch := await self._call.read()) is not grpc.aio.EOF:
                for step in batch.steps:
                    for out in step.outputs:
                        stream = self._streams.get(out.request_id)
                        if stream is not None:
                            stream.push(out, step.step_ms)
                            if out.finish_reason:
                                del self._streams[out.request_id]
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            reason = "router shutting down"
        self.alive = False
        error = RouterError(grpc.StatusCode.UNAVAILABLE, f"worker {self.info.worker_id} ({self.info.address}) "
                                                         f"unreachable: its output stream broke ({reason})")
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(error)
        if reason != "router shutting down":
            log.warning("%s", error.reason)

    async def close_all(self) -> None:
        self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class WorkerSessions:
    """One session per worker, attached on first use. Each session has an id of its own (this router's id and
    a count), so a stream attached anew never meets the worker's leftovers of the one before."""

    def __init__(self, channels: WorkerChannels, attach_timeout_s: float = 5.0) -> None:
        self.router_id = uuid.uuid4().hex
        self._count = itertools.count()
        self._channels = channels
        self._timeout = attach_timeout_s
        self._sessions: dict[str, WorkerSession] = {}
        self._attaching: dict[str, asyncio.Task[WorkerSession]] = {}

    async def get(self, info: WorkerInfo) -> WorkerSession:
        """The live session to `info`'s worker (attaching if there is none); RouterError UNAVAILABLE if the
        worker cannot be reached."""
        key = f"{info.worker_id}@{info.address}"
        session = self._sessions.get(key)
        if session is not None and session.alive:
            return session
        task = self._attaching.get(key)
        if task is None:  # one attach per worker, shared by every request that waits for it
            task = self._attaching[key] = asyncio.ensure_future(self._attach(key, info))
            task.add_done_callback(lambda t: self._attaching.pop(key, None) and (t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    async def _attach(self, key: str, info: WorkerInfo) -> WorkerSession:
        session = WorkerSession(self._channels, info, f"{self.router_id}-{next(self._count)}")
        await session.start(self._timeout)
        self._sessions[key] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        await asyncio.gather(*(s.close_all() for s in sessions.values()))
