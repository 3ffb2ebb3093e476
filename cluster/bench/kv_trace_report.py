"""Phases of traced KV handoffs (`PDSERVE_KV_TRACE`, see `cluster.kv_trace`), in ms, p50 / p90.

Per handoff, from the sender's and the receiver's monotonic times (their lines joined by request id):
  exposed    sender's finish() (the prefill is done) -> the receiver's answer is in: what TTFT pays
  all_sent   finish() -> every layer enqueued (negative: streamed out before the prefill ended)
  end_seen   every layer enqueued -> the receiver read the last control message ("end"/"done")
  posted     every layer enqueued -> the receiver posted its last receive (nccl/gloo: lags its control thread)
  data       "end" read -> the receiver saw the data in (its GPU work behind the transfer)
  answer     the receiver answered -> the sender read it
  copies     (cuda_ipc) every layer enqueued -> the sender saw its copies end
  seen_late  (cuda_ipc) the sender saw its copies end -> the receiver did (its poll of the IPC event)
  post_busy  (a duration) the receiver's control thread's time posting the transfer's chunks (nccl/gloo)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.bench.metrics import percentile
from cluster.kv_trace import RECEIVER_FILE, SENDER_FILE

_PHASES = {
    "exposed": ("finish", "reply"),
    "all_sent": ("finish", "all_sent"),
    "end_seen": ("all_sent", "rx.end"),
    "posted": ("all_sent", "rx.posted"),
    "data": ("rx.end", "rx.data"),
    "answer": ("rx.reply", "reply"),
    "copies": ("all_sent", "drained"),
    "seen_late": ("drained", "rx.data"),
    "post_busy": (None, "rx.post_s"),
}


def _lines(folder: str | Path, side: str) -> list[dict[str, Any]]:
    entries = []
    for path in sorted(Path(folder).glob(f"**/{side}-*.jsonl")):
        entries.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return entries


def load_trace(folder: str | Path) -> list[dict[str, Any]]:
    """Every traced handoff under `folder` (all processes' files): the sender's times, with the receiver's
    under "rx" (its line for the same transport and request id that answered last before the sender's reply
    was in: a request retried after an abort has one line per landed attempt)."""
    received: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rx in _lines(folder, RECEIVER_FILE):
        received.setdefault((rx["transport"], rx["rid"]), []).append(rx)
    entries = _lines(folder, SENDER_FILE)
    for e in entries:
        answered = [rx for rx in received.get((e["transport"], e["rid"]), []) if rx.get("reply", 0.0) <= e["reply"]]
        if answered:
            e["rx"] = max(answered, key=lambda rx: rx["reply"])
    return entries


def _time(entry: dict[str, Any], key: str | None) -> float | None:
    if key is None:
        return 0.0
    if key.startswith("rx."):
        return (entry.get("rx") or {}).get(key[3:])
    return entry.get(key)


def phase_summary(entries: list[dict[str, Any]], window: tuple[float, float] | None = None) -> dict[str, Any]:
    """p50/p90 (ms) of each phase over the handoffs whose finish() fell in `window` (monotonic s)."""
    if window is not None:
        entries = [e for e in entries if window[0] <= e.get("finish", -1.0) <= window[1]]
    out: dict[str, Any] = {"handoffs": len(entries)}
    for name, (a, b) in _PHASES.items():
        values = []
        for e in entries:
            ta, tb = _time(e, a), _time(e, b)
            if ta is not None and tb is not None:
                values.append((tb - ta) * 1e3)
        if values:
            out[name] = {"p50": percentile(values, 50), "p90": percentile(values, 90)}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """One line: `phase p50/p90` for each phase measured."""
    parts = [f"{name} {v['p50']:.2f}/{v['p90']:.2f}" for name, v in summary.items() if isinstance(v, dict)]
    return f"{summary['handoffs']} handoffs, ms p50/p90: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    """`python -m cluster.bench.kv_trace_report DIR`: phases per (transport, blocks, streamed) of DIR's traces."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m cluster.bench.kv_trace_report DIR  (a PDSERVE_KV_TRACE folder)")
    groups: dict[tuple[str, int, bool], list[dict[str, Any]]] = {}
    for e in load_trace(args[0]):
        groups.setdefault((e["transport"], e["blocks"], e["streamed"]), []).append(e)
    for (name, blocks, streamed), entries in sorted(groups.items()):
        print(f"{name} {blocks} blocks{' streamed' if streamed else ''}: {format_summary(phase_summary(entries))}")


if __name__ == "__main__":
    main()
