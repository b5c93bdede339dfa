"""Shared output of the benchmarks: the machine they ran on, a printed table, a JSON file."""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import sys
from pathlib import Path


def machine_info() -> dict:
    import torch

    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "command": "tokenq " + " ".join(sys.argv[1:]),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cell(value: object) -> str:
    """A table's cell: a number of one decimal, or of three significant digits below 1 (so that a short run's
    seconds do not read 0.0); "-" for what was not measured (None, NaN: a TPOT of one-token requests, say)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if 0 < abs(value) < 1 else f"{value:,.1f}"
    return str(value)


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")


def metric_totals(page: str, names: list[str]) -> dict[str, float | None]:
    """The sum of each metric's samples on a Prometheus text page; None for one the page lacks."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name in names:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return {name: found.get(name) for name in names}
