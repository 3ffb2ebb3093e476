"""Synthetic workloads: request lengths (fixed, ratio-spread or uniform ranges) and random token-id prompts."""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class LengthSpec:
    """Prompt and output lengths of a workload.

    With `input_range`/`output_range` (lo, hi) lengths are uniform integers in [lo, hi]. Otherwise they
    are uniform in [len * (1 - range_ratio), len * (1 + range_ratio)] (as `vllm bench --random-range-ratio`);
    range_ratio 0 gives fixed lengths.
    """

    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    input_range: tuple[int, int] | None = None
    output_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input and output lengths must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range ratio must be in [0, 1), got {self.range_ratio}")
        for name in ("input_range", "output_range"):
            r = getattr(self, name)
            if r is not None and not 1 <= r[0] <= r[1]:
                raise ValueError(f"{name} must be LO,HI with 1 <= LO <= HI, got {r}")

    def bounds(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((input lo, hi), (output lo, hi)): the smallest and largest lengths this spec draws."""
        def spread(n: int) -> tuple[int, int]:
            return max(1, math.floor(n * (1 - self.range_ratio))), max(1, math.ceil(n * (1 + self.range_ratio)))
        return self.input_range or spread(self.input_len), self.output_range or spread(self.output_len)

    def sample(self, n: int, seed: int) -> list[tuple[int, int]]:
        """n (prompt length, output length) pairs, reproducible from `seed`."""
        rng = random.Random(seed)
        (ilo, ihi), (olo, ohi) = self.bounds()
        return [(rng.randint(ilo, ihi), rng.randint(olo, ohi)) for _ in range(n)]

    def check_fits(self, max_model_len: int) -> None:
        """ValueError if the longest prompt plus the longest output exceeds the model's context."""
        (_, ihi), (_, ohi) = self.bounds()
        if ihi + ohi > max_model_len:
            raise ValueError(f"longest request ({ihi} prompt + {ohi} output tokens) exceeds the model's "
                             f"maximum length {max_model_len}")


def random_prompts(lengths: list[int], vocab_size: int, seed: int, avoid: Collection[int] = ()) -> list[list[int]]:
    """Token-id prompts of the given lengths, ids uniform over the vocabulary minus `avoid` (special tokens)."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    rng = random.Random(seed)
    excluded = set(avoid)
    pool = [t for t in range(vocab_size) if t not in excluded] or list(range(vocab_size))
    return [[rng.choice(pool) for _ in range(n)] for n in lengths]


def parse_range(text: str | None) -> tuple[int, int] | None:
    """'1024,4096' -> (1024, 4096)."""
    if not text:
        return None
    parts = [p for p in text.replace(":", ",").split(",") if p.strip()]
    if len(parts) != 2:
        raise ValueError(f"expected a range LO,HI, got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_rates(text: str) -> list[float]:
    """'1,2,4,inf' -> [1.0, 2.0, 4.0, inf] (requests per second; inf sends everything at once)."""
    rates = [float(p) for p in text.split(",") if p.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"request rates must be positive numbers or inf, got {text!r}")
    return rates
