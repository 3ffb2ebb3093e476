"""`pdserve bench kv --prefill --profile`: a torch.profiler timeline of one prefill alone and one with its KV
streamed, per transport and prompt length, so a streamed prefill that runs slower can be taken apart.

Writes into the run folder's `profile/`: `<tag>-<mode>.json` (Chrome trace: chrome://tracing or Perfetto) and
`<tag>-ops.txt`, every op's own device time (CPU time on a CPU run) alone vs streamed, biggest change first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MODES = ("alone", "streamed")
_TOP = 25


def _self_time_us(event: Any, cuda: bool) -> float:
    if not cuda:
        return float(event.self_cpu_time_total)
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


def profile_case(folder: str, tag: str, device: torch.device, run: Callable[[str], float]) -> dict[str, Any]:
    """Profile `run(mode)` once per mode; write the traces and the per-op comparison; return the file names
    and the wall times of the profiled runs (ms; the profiler adds its own overhead to them)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    per_op: dict[str, dict[str, float]] = {}
    wall: dict[str, float] = {}
    for mode in MODES:
        with profile(activities=activities) as prof:
            wall[mode] = run(mode) * 1e3
        prof.export_chrome_trace(str(out / f"{tag}-{mode}.json"))
        for ev in prof.key_averages():
            per_op.setdefault(ev.key, dict.fromkeys(MODES, 0.0))[mode] += _self_time_us(ev, cuda) / 1e3
    rows = sorted(per_op.items(), key=lambda kv: -abs(kv[1]["streamed"] - kv[1]["alone"]))
    unit = "device" if cuda else "CPU"
    lines = [f"{tag}: each op's own {unit} time, ms (profiled runs: alone {wall['alone']:.2f} ms, "
             f"streamed {wall['streamed']:.2f} ms wall)",
             f"{'alone':>9} {'streamed':>9} {'change':>9}  op",
             f"{sum(v['alone'] for v in per_op.values()):>9.3f} {sum(v['streamed'] for v in per_op.values()):>9.3f}"
             f" {'':>9}  (all ops)"]
    lines += [f"{v['alone']:>9.3f} {v['streamed']:>9.3f} {v['streamed'] - v['alone']:>+9.3f}  {name[:100]}"
              for name, v in rows[:_TOP]]
    (out / f"{tag}-ops.txt").write_text("\n".join(lines) + "\n")
    return {"traces": [f"{tag}-{m}.json" for m in MODES], "ops": f"{tag}-ops.txt", "wall_ms": wall}
