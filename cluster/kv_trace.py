"""Opt-in timeline of each KV handoff, for finding where a slow one waits.

A transport end given a `KVTrace` (the workers and `pdserve bench kv` make one from `PDSERVE_KV_TRACE=<dir>`,
read once when the transport opens) keeps a `Timeline` per handoff and appends it as one JSON line when the
handoff ends: the sender's to `<dir>/kv-trace-<pid>.jsonl`, the receiver's to `<dir>/kv-receive-<pid>.jsonl`.
Nothing travels on the wire for it. All times are `time.monotonic()` (CLOCK_MONOTONIC), which every process
of one host shares, so `load_trace` (cluster.bench.kv_trace_report) joins a sender's line with the receiver's
by request id. Without a trace the transports use `NO_TRACE`, whose timelines record nothing. The cluster
launcher passes the variable on to its workers; `pdserve bench compare --kv-trace` sets it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from cluster import env

ENV = env.KV_TRACE
SENDER_FILE, RECEIVER_FILE = "kv-trace", "kv-receive"


def trace_dir() -> str | None:
    """Where traces go, or None when tracing is off."""
    return os.environ.get(ENV) or None


class Timeline:
    """One handoff's times (monotonic s) and facts, written as one line by `done`."""

    def __init__(self, trace: KVTrace, side: str, fields: dict[str, Any]) -> None:
        self._trace, self._side, self.entry = trace, side, fields

    def mark(self, name: str) -> None:
        """Now is when `name` happened."""
        self.entry[name] = time.monotonic()

    def add(self, name: str, seconds: float) -> None:
        """Add to the duration `name` (a thread's busy time over several steps)."""
        self.entry[name] = self.entry.get(name, 0.0) + seconds

    def done(self, **fields: Any) -> None:
        """The handoff ended well: write its line."""
        self._trace.write(self._side, {**self.entry, **fields})


class _NoTimeline(Timeline):
    def __init__(self) -> None:
        pass

    def mark(self, name: str) -> None:
        pass

    def add(self, name: str, seconds: float) -> None:
        pass

    def done(self, **fields: Any) -> None:
        pass


class KVTrace:
    """Writes handoff timelines under `folder`, one file per process and side."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._files: dict[str, Any] = {}

    @classmethod
    def from_env(cls) -> KVTrace:
        """A trace into `PDSERVE_KV_TRACE`'s folder, or `NO_TRACE` when it is unset."""
        where = trace_dir()
        return cls(where) if where else NO_TRACE

    def timeline(self, side: str, **fields: Any) -> Timeline:
        """A new handoff's timeline; `side` is SENDER_FILE or RECEIVER_FILE."""
        return Timeline(self, side, fields)

    def write(self, side: str, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            f = self._files.get(side)
            if f is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                f = self._files[side] = open(self.folder / f"{side}-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115
            f.write(line)


class _NoTrace(KVTrace):
    def __init__(self) -> None:
        pass

    def timeline(self, side: str, **fields: Any) -> Timeline:
        return _NO_TIMELINE


_NO_TIMELINE = _NoTimeline()
NO_TRACE: KVTrace = _NoTrace()
