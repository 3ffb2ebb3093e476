"""A sender's connection to one receiver endpoint: the `Link` (control socket plus transport state) and the
`OutPair` that holds the current link and orders messages on it (see `_paired`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cluster.transport._sock_ctl import CtlConn
from cluster.transport.base import TransportError


@dataclass(eq=False)
class Link:
    """One connection to a receiver. Replies arrive by sequence number; whoever waits reads for everyone."""

    ctl: CtlConn
    seq: int = 0
    broken: str | None = None
    cv: threading.Condition = field(default_factory=threading.Condition)
    replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    reading: bool = False

    def await_reply(self, seq: int, deadline: float, spin_s: float = 0.0) -> dict[str, Any]:
        """The receiver's reply to `seq`; TransportError on timeout or when the link broke. `spin_s`: the
        reply is due any moment, poll for it that long before sleeping (see `CtlConn.recv`)."""
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
            with self.cv:
                self.replies[int(msg.get("seq", -1))] = msg

    def mark_broken(self, why: str) -> None:
        with self.cv:
            self.broken = self.broken or why
            self.cv.notify_all()
        self.ctl.close()


@dataclass
class OutPair:
    """Sender-side state of one receiver endpoint; `lock` orders messages (and their data) on the link."""

    endpoint: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    link: Any = None
