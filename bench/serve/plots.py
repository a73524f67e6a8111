"""PNG plots of a sweep (matplotlib, from the `bench` extra; without it, no plots)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.serve.stats import PERCENTILES, LevelResult


def plot(rows: list[LevelResult], prefix: Path, mode: str, title: str) -> list[Path]:
    """Throughput vs level, and TTFT/ITL percentiles vs level: one colour per server and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    xlabel = "concurrent streams" if mode == "concurrency" else "offered request rate (req/s)"
    runs = list(dict.fromkeys((r.server, r.dtype) for r in rows))  # ours first, as swept
    levels = sorted({r.level for r in rows})
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    # Minor ticks of a log axis: label 2x and 5x only, or they collide.
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else "")

    def series(run: tuple[str, str], attr: str) -> list[tuple[float, float]]:
        mine = [r for r in rows if (r.server, r.dtype) == run and r.completed]
        return sorted((r.level, getattr(r, attr)) for r in mine if getattr(r, attr) is not None)

    def axes_style(ax: Any, ylabel: str, log_y: bool) -> None:
        ax.set(xscale="log", yscale="log" if log_y else "linear", xlabel=xlabel, ylabel=ylabel)
        ax.set_xticks(levels, [f"{v:g}" for v in levels])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)

    paths = [
        prefix.with_name(prefix.name + "-throughput.png"),
        prefix.with_name(prefix.name + "-latency.png"),
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, run in enumerate(runs):
        ax.plot(*zip(*series(run, "output_tokens_per_s"), strict=True), "o-", color=f"C{i}",
                label=f"{run[0]} ({run[1]})")  # fmt: skip
    axes_style(ax, "output tokens/s", log_y=False)
    ax.set_ylim(bottom=0)
    ax.set_title(f"Throughput: {title}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, metric, label in ((axes[0], "ttft", "time to first token (ms)"),
                              (axes[1], "itl", "inter-token latency (ms)")):  # fmt: skip
        for i, run in enumerate(runs):
            for q, style in zip(PERCENTILES, ("o-", "s--", "^:"), strict=True):
                if pts := series(run, f"{metric}_ms_p{q}"):
                    ax.plot(*zip(*pts, strict=True), style, color=f"C{i}", label=f"{run[0]} {run[1]} p{q}")
        axes_style(ax, label, log_y=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(runs), fontsize=7)
    fig.suptitle(f"Latency percentiles (p50 solid, p90 dashed, p99 dotted): {title}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 * len(PERCENTILES), 1, 1))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
