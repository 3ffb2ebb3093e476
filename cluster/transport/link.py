"""A sender's connection to one receiver of the socket-controlled transports.

`Route` is the sender's state for one receiver endpoint: its `lock` keeps every control message and the data
that follows it in one order on both sides, and it holds the current `Link`. A `Link` is one paired
connection (control connection plus the mover's pairing state: a process group, a mapped peer cache);
several handoffs may be under way on it at once, each with its own sequence number. Any failure other than
a rejection drops the link as a whole, and the next send connects afresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cluster.transport import kv_transfer_pb2 as kpb
from cluster.transport.api import TransportError
from cluster.transport.control import ControlConn

P = TypeVar("P")


@dataclass(eq=False)
class Link(Generic[P]):
    """One connection to a receiver; `peer` is the mover's pairing state. Replies arrive by sequence number;
    whichever thread waits reads for everyone."""

    endpoint: str
    ctl: ControlConn
    peer: P
    seq: int = 0
    broken: str | None = None
    cv: threading.Condition = field(default_factory=threading.Condition)
    replies: dict[int, kpb.KVReply] = field(default_factory=dict)
    reading: bool = False

    def await_reply(self, seq: int, deadline: float, spin_s: float = 0.0) -> kpb.KVReply:
        """The receiver's reply to `seq`; TransportError on timeout or when the link broke. `spin_s`: the reply
        is due any moment, poll for it that long before sleeping (see `ControlConn.recv`)."""
        while True:
            with self.cv:
                while not (seq in self.replies or self.broken or not self.reading):
                    if not self.cv.wait(deadline - time.monotonic()):
                        raise TransportError("KV receiver did not answer in time")
                if seq in self.replies:
                    return self.replies.pop(seq)
                if self.broken:
                    raise TransportError(self.broken)
                self.reading = True
            try:
                msg = self.ctl.recv(deadline - time.monotonic(), spin_s)
            except TimeoutError:
                raise TransportError("KV receiver did not answer in time") from None
            finally:
                with self.cv:
                    self.reading = False
                    self.cv.notify_all()
            if msg.WhichOneof("kind") != "reply":
                raise TransportError(f"KV receiver out of step: a {msg.WhichOneof('kind')} message, not a reply")
            with self.cv:
                self.replies[msg.reply.seq] = msg.reply

    def mark_broken(self, why: str) -> None:
        with self.cv:
            self.broken = self.broken or why
            self.cv.notify_all()
        self.ctl.close()


@dataclass(eq=False)
class Route(Generic[P]):
    """The sender's state for one receiver endpoint: the current link and the lock that orders it.
    `close_link(link, polite)` releases a link's pairing state (the mover's)."""

    endpoint: str
    close_link: Callable[[Link[P], bool], None]
    lock: threading.Lock = field(default_factory=threading.Lock)
    link: Link[P] | None = None

    def drop(self, link: Link[P], why: str) -> None:
        """Forget a broken link: streams still on it fail, the next send connects afresh."""
        if self.link is link:
            self.link = None
        if link.broken is None:
            link.mark_broken(why)
            self.close_link(link, False)

    def close(self) -> None:
        """On close: drop the link politely, waiting at most 5 s for a message in progress on it."""
        locked = self.lock.acquire(timeout=5.0)
        try:
            link, self.link = self.link, None
            if link is not None and link.broken is None:
                self.close_link(link, locked)
                link.mark_broken("transport closed")
        finally:
            if locked:
                self.lock.release()
