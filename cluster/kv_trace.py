"""Opt-in timeline of each KV handoff, for finding where a slow one waits.

With `PDSERVE_KV_TRACE=<dir>` in a sender's environment, every completed send appends one JSON line to
`<dir>/kv-trace-<pid>.jsonl`: the sender's own times and the receiver's (from its reply's "rx"). All times
are `time.monotonic()` (CLOCK_MONOTONIC), which every process of one host shares, so sender and receiver
times compare directly. `pdserve bench compare --kv-trace` summarises them per request rate
(`cluster.bench.kv_trace_report`). Receivers always put "rx" in their replies (a few floats); only the
writing is opt-in. The cluster launcher passes the variable on to its workers.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

ENV = "PDSERVE_KV_TRACE"
_lock = threading.Lock()
_files: dict[str, Any] = {}


def trace_dir() -> str | None:
    """Where traces go, or None when tracing is off."""
    return os.environ.get(ENV) or None


def record(entry: dict[str, Any]) -> None:
    """Append `entry` as one line to this process's trace file (no-op when tracing is off)."""
    where = trace_dir()
    if where is None:
        return
    line = json.dumps(entry, separators=(",", ":")) + "\n"
    with _lock:
        f = _files.get(where)
        if f is None:
            Path(where).mkdir(parents=True, exist_ok=True)
            f = _files[where] = open(Path(where) / f"kv-trace-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115
        f.write(line)
