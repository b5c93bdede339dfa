"""The picture of a `tokenq bench serve` run: latency percentiles (TTFT, TPOT, end to end) against the
offered load, and output tokens per second over time in each phase. Needs matplotlib (the `plot` extra).

    tokenq bench serve --rate 2 4 8 --plot serve.png
    python -m tokenq.bench.plot bench-serve.json serve.png   # from a saved run"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BIN_S = 1.0


def timeline(requests: list[list[float]], bin_s: float = BIN_S) -> tuple[list[float], list[float]]:
    """Output tokens per second in bins of bin_s, from each request's [first token s, done s, tokens]
    relative to the phase's start; a request's tokens are spread evenly between its first and last token."""
    if not requests:
        return [], []
    end = max(done for _, done, _ in requests)
    bins = [0.0] * (int(end / bin_s) + 1)
    for first, done, tokens in requests:
        span = max(done - first, 1e-9)
        for i in range(int(first / bin_s), int(done / bin_s) + 1):
            overlap = min(done, (i + 1) * bin_s) - max(first, i * bin_s)
            if overlap > 0 or span <= 1e-9:
                bins[i] += tokens * (overlap / span if span > 1e-9 else 1.0)
    return [(i + 0.5) * bin_s for i in range(len(bins))], [b / bin_s for b in bins]


def _legend(ax) -> None:
    """A legend where something is labelled (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot_serve(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    phases = sorted(result["phases"], key=lambda p: p["rate"])
    # Poisson phases go on the load axis; an all-at-once (inf) phase has no offered rate: a dashed line.
    poisson = [p for p in phases if math.isfinite(p["rate"])]
    burst = [p for p in phases if not math.isfinite(p["rate"])]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x = [p["rate"] for p in poisson]
    for ax, key, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "e2e_ms", "end-to-end latency")):
        series = [(key, q, style, q) for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:"))]
        if key == "ttft_ms":
            series.append(("tpot_ms", "p50", "x-", "TPOT p50"))
        for i, (field, q, style, label) in enumerate(series):
            color = palette[i % len(palette)]
            ys = [p[field].get(q) for p in poisson]
            if ys and all(y is not None for y in ys):
                ax.plot(x, ys, style, color=color, label=label)
            for p in burst:  # drawn whether or not a Poisson phase ran (`--rate inf` alone)
                if p[field].get(q) is not None:
                    ax.axhline(p[field][q], color=color, linestyle="--", alpha=0.5, label=f"{label}, all at once")
        ax.set(title=title, xlabel="offered load (requests/s)", ylabel="ms")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        _legend(ax)
    ax = axes[2]
    for p in phases:
        xs, ys = timeline(p.get("requests", []))
        if xs:
            rate = f"{p['rate']:g} req/s" if math.isfinite(p["rate"]) else "all at once"
            ax.plot(xs, ys, label=f"{rate} ({p['output_tokens_per_s']:.0f} tok/s overall)")
    ax.set(title="output throughput over time", xlabel="seconds into the phase", ylabel="tokens/s")
    ax.grid(True, alpha=0.3)
    _legend(ax)
    fig.suptitle(f"tokenq bench serve: {result.get('model')} on {result.get('device')}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tokenq.bench.plot BENCH-SERVE.json OUT.png")
    print(plot_serve(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]))
