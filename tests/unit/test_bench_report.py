"""The benchmarks' tables: numbers as a reader compares them, and nothing shown for what was not measured."""

from __future__ import annotations

import math

from tokenq.bench.report import cell, print_table


def test_cells():
    assert [cell(v) for v in (1234.56, 5.26, 0.025, 0.0004567, 0.0, 7, "tokenq")] == [
        "1,234.6", "5.3", "0.025", "0.000457", "0.0", "7", "tokenq"]
    assert cell(None) == cell(math.nan) == "-"  # a TPOT of one-token requests: not measured, not "None"


def test_a_table_lines_up(capsys):
    print_table("t", ["path", "TPOT p50"], [["ours", 5.26], ["one token", None]])
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[1:] == ["     path  TPOT p50", "---------  --------", "     ours       5.3", "one token         -"]
