"""What both processes of `pdserve bench kv` share: the plan, the timing loop, the block ids they use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cluster.engine.kv_layout import KVLayout


@dataclass(frozen=True)
class Plan:
    """What both processes need: the layout, cache size, devices and the measurement settings."""

    layout: KVLayout
    num_blocks: int
    devices: tuple[str, str]  # sender, receiver
    raw_backend: str
    transports: tuple[str, ...]
    prompt_lens: tuple[int, ...]
    warmup: int
    repeats: int
    min_repeats: int
    case_budget_s: float
    send_timeout_s: float
    seed: int
    prefill_model: str | None = None  # with weights: also time prefill alone / streamed / bulk (kv_prefill)
    receiver_busy: bool = False  # a pure-Python thread spins in the receiver, as a busy decode engine does
    contiguous_ids: bool = False  # consecutive block ids on both sides instead of scattered ones
    churned_ids: bool = False  # ids as two caches that have served a while hand them out (bench blocks' replay)
    switch_interval_s: float | None = None  # sys.setswitchinterval in both processes (None: Python's 5 ms)
    profile_dir: str | None = None  # with prefill_model: a torch.profiler timeline per case (kv_profile)

    @property
    def one_gpu(self) -> bool:
        """Sender and receiver on one GPU: the raw reference is a copy within it (NCCL cannot pair them)."""
        return self.devices[0] == self.devices[1] != "cpu"

    def group_device(self, device: torch.device) -> torch.device:
        """Where tensors for the raw reference's process group live (gloo: host memory)."""
        return torch.device("cpu") if self.raw_backend == "gloo" else device


def timed_loop(run_once: Callable[[int], float], warmup: int, repeats: int, min_repeats: int,
               budget_s: float) -> tuple[list[float], int, bool]:
    """Run `run_once(i)` (returns seconds) `warmup` times untimed, then up to `repeats` times timed.

    Slow cases are capped: warm-ups stop once they used half of `budget_s`, and the timed runs are cut to
    what fits in `budget_s` at the fastest warm-up's pace (never below `min_repeats`).
    Returns (timed seconds, warm-ups run, whether the repeats were capped).
    """
    warm: list[float] = []
    while len(warm) < max(warmup, 1):
        warm.append(run_once(len(warm)))
        if sum(warm) > budget_s / 2:
            break
    fit = int(budget_s / max(min(warm), 1e-9))
    reps = repeats if fit >= repeats else max(min(min_repeats, repeats), fit)
    times = [run_once(len(warm) + i) for i in range(reps)]
    return times, len(warm), reps < repeats


def block_ids(plan: Plan, n: int) -> tuple[list[int], list[int]]:
    """Seeded, scattered source and destination block ids (a fully fragmented cache); with
    `plan.contiguous_ids` one run of consecutive ids on each side, at different offsets; with
    `plan.churned_ids` the ids the workers' allocators hand out after serving a while."""
    if plan.contiguous_ids:
        return list(range(n)), list(range(plan.num_blocks - n, plan.num_blocks))
    if plan.churned_ids:
        from cluster.bench.blocks_bench import churned_ids

        return churned_ids(plan.num_blocks, plan.layout.block_size, n, plan.seed + n)
    g = torch.Generator().manual_seed(plan.seed + n)
    return (torch.randperm(plan.num_blocks, generator=g)[:n].tolist(),
            torch.randperm(plan.num_blocks, generator=g)[:n].tolist())


def busy_python() -> None:
    """Hold the GIL the way a busy engine loop does: pure-Python work, no blocking calls."""
    x = 0
    while True:
        for i in range(10_000):
            x = (x + i * i) % 1_000_003
