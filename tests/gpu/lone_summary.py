"""One line per `tokenq bench serve` JSON: the TTFT the queue path adds to lone requests, and its hops."""

import json
import sys
from pathlib import Path

for name in sys.argv[1:]:
    r = json.loads(Path(name).read_text())
    hops = ", ".join(f"{k} {v:.2f}" for k, v in r["low_load_ttft_hops_ms_p50"].items())
    print(f"{Path(name).name:26s} hot loop {r['workload'].get('hot_loop', '?')!s:5s} added {r['ttft_overhead_ms_paired_p50']:.2f} ms "
          f"(vs back to back {r['ttft_overhead_ms_paired_p50_vs_back_to_back']:.2f}); {hops}; "
          f"engine extra {r['engine_extra_ms_paired_p50']:.2f}; client floor {r['client_floor_ttft_ms']['p50']:.2f}")
