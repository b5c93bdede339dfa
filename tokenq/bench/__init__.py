"""Benchmarks: each prints a table and writes JSON, with its peer measured in the same run."""

from __future__ import annotations

import argparse


def run_bench(args: argparse.Namespace) -> int:
    if args.bench_cmd == "engine":
        from tokenq.bench.engine import bench_engine

        return bench_engine(args)
    raise SystemExit(f"unknown benchmark {args.bench_cmd!r}")
