"""PNG plots of a serving sweep: goodput and SLO attainment against request rate, latency CDFs per rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib's pyplot on a file-only backend; the bench extra when it is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise RuntimeError("plots need matplotlib: pip install 'pdserve[bench]' (or pip install matplotlib)") from None

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def rate_label(rate: float) -> str:
    """1.0 -> '1', 2.5 -> '2.5', inf -> 'inf'."""
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _x_positions(rates: Sequence[float]) -> list[float]:
    """Finite rates stay where they are; inf sits one step to the right of the largest finite rate."""
    finite = [r for r in rates if math.isfinite(r)]
    top = max(finite) if finite else 1.0
    step = (top / len(finite)) if finite else 1.0
    return [r if math.isfinite(r) else top + step for r in rates]


def goodput_figure(points: Sequence[dict[str, Any]], target: float = 0.9) -> Any:
    """Throughput (req/s) and, with SLOs, goodput and SLO attainment (%) against the offered request rate;
    both y-axes start at 0 and the legend sits below the axes, off the data."""
    plt = pyplot()
    pts = sorted(points, key=lambda p: p["rate"])
    rates = [p["rate"] for p in pts]
    xs = _x_positions(rates)
    with_slo = all(p.get("slo_attainment") is not None for p in pts)
    fig, ax = plt.subplots(figsize=(7, 5))
    if with_slo:
        ax.plot(xs, [p["goodput"] for p in pts], "o-", color="tab:blue", label="goodput (req/s)")
    ax.plot(xs, [p["request_throughput"] for p in pts], "s--", color="tab:gray", alpha=0.7,
            label="throughput (req/s)")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("requests / s")
    ax.set_xticks(xs, [rate_label(r) for r in rates])
    ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    if with_slo:
        ax2 = ax.twinx()
        ax2.plot(xs, [100 * p["slo_attainment"] for p in pts], "^-", color="tab:green", label="SLO attainment (%)")
        ax2.axhline(100 * target, color="tab:red", ls=":", lw=1, label=f"{100 * target:g}% target")
        ax2.set_ylabel("SLO attainment (%)")
        ax2.set_ylim(0, 105)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.set_title("goodput vs request rate" if with_slo else "throughput vs request rate (no SLO: no goodput)")
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_goodput(points: Sequence[dict[str, Any]], path: Path, target: float = 0.9) -> Path:
    """`goodput_figure` as a PNG."""
    fig = goodput_figure(points, target)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_latency_cdfs(per_rate: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Empirical CDFs of TTFT and TPOT (ms), one line per rate: {rate label: {'ttft_ms': [...], 'tpot_ms': [...]}}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        for label, data in per_rate.items():
            xs = sorted(data.get(key, []))
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"rate {label}")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6) or 1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
