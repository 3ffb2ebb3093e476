"""Run metadata (device, versions, model shape, git commit, command line, time), JSON output, device timers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cluster import env

T = TypeVar("T")
_REPO = Path(__file__).resolve().parents[2]


def git_commit() -> dict[str, Any] | None:
    """HEAD commit of the pdserve checkout and whether the tree has local changes; None outside git.
    `PDSERVE_COMMIT` names the commit of a tree copied without its history (a GPU host's copy), and wins."""
    if named := os.environ.get(env.COMMIT):
        return {"commit": named, "dirty": None, "from": "PDSERVE_COMMIT"}

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=_REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: str | None) -> str:
    """GPU name for CUDA devices, the CPU model otherwise."""
    if device and device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_summary(model_dir: str | Path) -> dict[str, Any]:
    """Shape of the model from its config.json via ModelSpec (with the parameter count)."""
    from cluster.engine.models.loader import read_model_spec

    return {"path": str(model_dir), **spec_summary(read_model_spec(model_dir))}


def spec_summary(spec: Any) -> dict[str, Any]:
    """The shape fields of a ModelSpec, with the parameter count."""
    keys = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings")
    return {**{k: getattr(spec, k) for k in keys}, "num_params": spec.num_params}


def versions() -> dict[str, str | None]:
    """Python, torch, transformers and pdserve versions (None where not importable)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "pdserve"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def local_device() -> str:
    """'cuda' when this host has a GPU torch can use, else 'cpu'."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def metadata(kind: str, args: Any, device: str | None, model_dir: str | Path | None) -> dict[str, Any]:
    """The header every result JSON carries. `device=None` (serving benchmarks): the model runs elsewhere,
    so `device_name` names this host's GPU or CPU and `device_note` says so."""
    options = {k: v for k, v in vars(args).items() if not callable(v)}
    note = None
    if device is None:
        note = "the benchmark client's host; the model runs on the cluster's workers (often the same host)"
    return {
        "benchmark": kind,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command_line": shlex.join(sys.argv),
        "options": options,
        "git": git_commit(),
        "host": platform.node(),
        "device": device,
        "device_name": device_name(device or local_device()),
        "device_note": note,
        "versions": versions(),
        "model": model_summary(model_dir) if model_dir and Path(model_dir, "config.json").is_file() else None,
    }


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write strict JSON (NaN -> null, inf -> "inf") and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    return path


def run_dir(out: str | Path, kind: str) -> Path:
    """A fresh folder OUT/<kind>-<UTC time> for one run's files."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    base = Path(out) / f"{kind}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


class DeviceTimer:
    """Times a callable: CUDA events after a synchronize on GPUs, `time.perf_counter` on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        if self.cuda:
            import torch

            self._torch = torch
            self._device = torch.device(device)

    def time(self, fn: Callable[[], T]) -> tuple[T, float]:
        """Run fn once; return its result and the elapsed seconds (all queued device work included)."""
        if not self.cuda:
            start = time.perf_counter()
            result = fn()
            return result, time.perf_counter() - start
        torch = self._torch
        with torch.cuda.device(self._device):  # events on this device's current stream
            torch.cuda.synchronize()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            return result, begin.elapsed_time(end) / 1000.0


def print_rows(head: str, rows: list[dict[str, Any]], lead: Callable[[dict[str, Any]], str],
               body: Callable[[dict[str, Any]], str]) -> None:
    """A text table: `head`, a rule, then `lead(row) body(row)` per row (rows with an "error" print it)."""
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{lead(r)}  ERROR {r['error']}" if "error" in r else f"{lead(r)} {body(r)}")
