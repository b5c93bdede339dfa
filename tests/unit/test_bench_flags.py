"""A `tokenq bench` flag whose value cannot work is argparse's one error line naming the flag (exit 2), or one
`error: ...` line before the benchmark starts (exit 1): never a traceback, a value silently taken, or a run
whose report cannot be written at its end."""

from __future__ import annotations

import argparse
import os
import sys

import pytest

from tokenq.cli import build_parser, main
from tokenq.flag_checks import EXIT_SETTINGS, OptionError, check_ranges


@pytest.fixture(autouse=True)
def _in_tmp(monkeypatch, tmp_path):
    """--out defaults to a file in the current folder, which argparse checks: make it a writable one."""
    monkeypatch.chdir(tmp_path)


def parse_fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


BAD = [
    ("engine", "--num-prompts", "0"), ("engine", "--num-prompts", "-1"), ("engine", "--output-len", "0"),
    ("engine", "--output-len", "-5"), ("engine", "--seed", "-1"), ("engine", "--min-prompt-len", "0"),
    ("throughput", "--output-len", "0"), ("latency", "--output-len", "-5"), ("prefix", "--output-len", "0"),
    ("serve", "--output-len", "0"), ("chat", "--output-len", "0"), ("batch", "--output-len", "-5"),
    ("throughput", "--num-requests", "0"), ("throughput", "--num-requests", "-1"),
    ("throughput", "--block-size", "0"), ("throughput", "--seed", "-1"), ("throughput", "--num-kv-blocks", "0"),
    ("throughput", "--max-num-seqs", "0"), ("throughput", "--peer-num-requests", "-3"),
    ("throughput", "--peer-num-requests", "0"), ("throughput", "--guided-fraction", "2"),
    ("throughput", "--guided-fraction", "-0.1"), ("throughput", "--gpu-memory-utilization", "0"),
    ("throughput", "--num-requests", "abc"),
    ("latency", "--repeats", "0"), ("prefix", "--num-requests", "0"), ("prefix", "--tail-len", "0"),
    ("serve", "--rate", "0"), ("serve", "--rate", "-5"), ("serve", "--rate", "nan"), ("serve", "--rate", "fast"),
    ("serve", "--low-load-requests", "0"), ("serve", "--low-load-pause-ms", "-10"),
    ("serve", "--gateway-workers", "0"), ("serve", "--client-procs", "0"),
    ("queue", "--client-procs", "0"), ("queue", "--concurrency", "abc"), ("queue", "--concurrency", "1,,2"),
    ("queue", "--concurrency", "0"), ("queue", "--requests", "0"), ("queue", "--xadd-ops", "0"),
    ("queue", "--paths", "bogus"), ("queue", "--paths", "library,bogus"), ("queue", "--target", "0"),
    ("batch", "--pause-ms", "-1"), ("chat", "--num-requests", "0"), ("cache", "--queries", "0"),
    ("cache", "--threshold", "1.5"), ("fp8-accuracy", "--num-prompts", "0"),
    ("throughput", "--device", "tpu"), ("throughput", "--device", "cuda:x"), ("latency", "--dtype", "fp8"),
    ("prefix", "--dtype", "half"),
]


@pytest.mark.parametrize("bench,flag,value", BAD)
def test_a_bad_value_is_one_error_line_naming_the_flag(bench, flag, value, capsys):
    err = parse_fails(capsys, bench, flag, value)
    assert f"argument {flag}:" in err


@pytest.mark.parametrize("bench", ["engine", "throughput", "latency", "prefix", "serve", "chat", "batch", "queue",
                                   "fp8-accuracy"])
def test_an_out_file_without_a_folder_to_write_it_in_fails_at_parse_time(bench, capsys, tmp_path):
    err = parse_fails(capsys, bench, "--out", str(tmp_path / "missing" / "x.json"))
    assert "argument --out:" in err and "no folder" in err
    err = parse_fails(capsys, bench, "--out", str(tmp_path))
    assert "argument --out:" in err and "is a folder" in err


def test_the_default_out_is_checked_too(capsys, tmp_path, monkeypatch):
    if sys.platform == "win32" or os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    monkeypatch.chdir(ro)
    err = parse_fails(capsys, "throughput")
    assert "argument --out:" in err and "not writable" in err


def test_pairs_that_are_not_there_say_what_to_pass(capsys):
    err = parse_fails(capsys, "semantic-cache")  # the default, relative to a folder that has no ../shared
    assert "argument --pairs: no such file" in err
    assert "pass --pairs FILE.jsonl: labelled question pairs, e.g. qqp-dev.jsonl" in err


def test_pairs_that_are_there_parse(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    args = build_parser().parse_args(["bench", "semantic-cache", "--pairs", str(pairs)])
    assert args.pairs == str(pairs)


@pytest.mark.parametrize("argv", [["engine"], ["throughput"], ["latency"], ["prefix"], ["serve"], ["queue"],
                                  ["chat"], ["batch"], ["fp8-accuracy"]])
def test_the_defaults_parse(argv):
    build_parser().parse_args(["bench", *argv])


def test_good_values_parse_to_what_the_run_reads():
    args = build_parser().parse_args(["bench", "queue", "--concurrency", "1, 8,16", "--paths", "library"])
    assert args.concurrency == "1,8,16" and args.paths == "library"
    args = build_parser().parse_args(["bench", "serve", "--rate", "2", "inf", "--low-load-pause-ms", "0"])
    assert args.rate == [2.0, float("inf")] and args.low_load_pause_ms == 0.0
    args = build_parser().parse_args(["bench", "throughput", "--device", "cuda:1", "--dtype", "float16",
                                      "--guided-fraction", "1", "--peer-num-requests", "3"])
    assert (args.device, args.dtype, args.guided_fraction, args.peer_num_requests) == ("cuda:1", "float16", 1.0, 3)


@pytest.mark.parametrize("bench", ["engine", "throughput", "serve", "batch"])
def test_min_prompt_len_above_max_is_one_error_line(bench, capsys, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the benchmark started although --min-prompt-len is above --max-prompt-len")

    monkeypatch.setattr("tokenq.bench.run_bench", started)
    for module in ("throughput", "serve", "batch"):
        monkeypatch.setattr(f"tokenq.bench.{module}.main", started)
    with pytest.raises(SystemExit) as e:
        main(["bench", bench, "--min-prompt-len", "64", "--max-prompt-len", "16"])
    assert e.value.code == EXIT_SETTINGS
    assert capsys.readouterr().err == "error: --min-prompt-len 64 is above --max-prompt-len 16\n"


def test_check_ranges_skips_a_bound_left_unset():
    check_ranges(argparse.Namespace(min_prompt_len=256, max_prompt_len=None, min_x=1, max_x=1))
    with pytest.raises(OptionError, match="--min-x 2 is above --max-x 1"):
        check_ranges(argparse.Namespace(min_x=2, max_x=1))


def test_bench_help_shows_defaults(capsys):
    for bench, shown in (("throughput", "default 512"), ("semantic-cache", "default ../shared/data/qqp-dev.jsonl"),
                         ("queue", "default 1,32,64"), ("engine", "default bench-engine.json"),
                         ("serve", "cpu or cuda (default auto)"), ("batch", "cpu or cuda (default auto)"),
                         ("engine", "cpu or cuda (default cpu)")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", bench, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert shown in out, bench
    for bench, device in (("serve", "auto"), ("batch", "auto"), ("engine", "cpu")):
        assert build_parser().parse_args(["bench", bench]).device == device


def test_device_cuda_without_cuda_is_one_error_line(monkeypatch):
    from tokenq.bench import gpu_common

    monkeypatch.setattr("tokenq.flag_checks.cuda_available", lambda: False)
    with pytest.raises(OptionError, match=r"^--device cuda: torch.cuda.is_available\(\) is False"):
        gpu_common.resolve_device("cuda")
    assert gpu_common.resolve_device("cpu") == "cpu"
