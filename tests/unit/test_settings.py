"""One settings object reads every TOKENQ_* option of the roles, with defaults and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tokenq.settings import DEFAULT_MODEL, Settings


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s.model == DEFAULT_MODEL and s.redis_url is None and s.home == Path.home() / ".tokenq"
    assert (s.lease_s, s.max_deliveries, s.drain_grace_s, s.gateway_workers) == (30.0, 3, 10.0, 1)
    assert s.webhook_retry_delays is None


def test_values_from_environment():
    s = Settings.from_env({"TOKENQ_LEASE_S": "2.5", "TOKENQ_MAX_DELIVERIES": "7", "TOKENQ_REDIS_URL": "redis://x",
                           "TOKENQ_WEBHOOK_RETRY_DELAYS": "0.1, 0.2", "TOKENQ_MAX_QUEUE_DEPTH": "0"})
    assert (s.lease_s, s.max_deliveries, s.redis_url, s.max_queue_depth) == (2.5, 7, "redis://x", 0)
    assert s.webhook_retry_delays == (0.1, 0.2)
    assert (Settings.from_env({}).throughput_log_s, Settings.from_env({}).webhook_gone_disable_s) == (30.0, None)
    s = Settings.from_env({"TOKENQ_THROUGHPUT_LOG_S": "0", "TOKENQ_WEBHOOK_GONE_DISABLE_S": "60"})
    assert (s.throughput_log_s, s.webhook_gone_disable_s) == (0.0, 60.0)


@pytest.mark.parametrize("name, value, words", [
    ("TOKENQ_LEASE_S", "soon", "is not a number"),
    ("TOKENQ_MAX_DELIVERIES", "2.5", "is not a whole number"),
    ("TOKENQ_WEBHOOK_RETRY_DELAYS", "1,soon", "is not a comma-separated list of seconds"),
])
def test_a_bad_value_names_the_variable(name, value, words):
    with pytest.raises(ValueError, match=f"{name}={value!r} {words}"):
        Settings.from_env({name: value})


@pytest.mark.parametrize("name, value, words", [
    ("TOKENQ_BATCH_WINDOW", "lots", "is not a number"),
    ("TOKENQ_BATCH_MAX_LINES", "10.5", "is not a whole number"),
])
def test_the_batch_settings_name_a_bad_variable_too(name, value, words):
    from batches.settings import BatchSettings

    assert BatchSettings.from_env({"TOKENQ_BATCH_MAX_LINES": "1e3"}).max_lines == 1000
    with pytest.raises(ValueError, match=f"{name}={value!r} {words}"):
        BatchSettings.from_env({name: value})


def test_a_gateway_with_a_bad_batch_setting_does_not_start(monkeypatch):
    from gateway.app import create_app

    monkeypatch.setenv("TOKENQ_FILES_QUOTA_BYTES", "ten gigabytes")
    with pytest.raises(ValueError, match="TOKENQ_FILES_QUOTA_BYTES"):
        create_app("redis://127.0.0.1:1")


def test_roles_read_the_environment_when_they_start(monkeypatch):
    from worker.recovery import Recovery

    class _Redis:
        def register_script(self, _script):
            return None

    monkeypatch.setenv("TOKENQ_LEASE_S", "4")
    assert Recovery(_Redis(), "m", "c").lease_s == 4.0


def test_kernel_choices_come_from_the_environment():
    assert (Settings.from_env({}).kernels, Settings.from_env({}).gemv) == ("triton", "triton")
    s = Settings.from_env({"TOKENQ_KERNELS": "Torch", "TOKENQ_GEMV": "cublas"})
    assert (s.kernels, s.gemv) == ("torch", "cublas")


def test_the_engine_config_carries_the_kernel_choices(monkeypatch):
    import argparse

    from tokenq.engine_options import add_engine_flags, engine_config_from

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert (engine_config_from(parser.parse_args([])).kernels, engine_config_from(parser.parse_args([])).gemv) == (
        "triton", "triton")
    monkeypatch.setenv("TOKENQ_KERNELS", "torch")
    monkeypatch.setenv("TOKENQ_GEMV", "cublas")
    cfg = engine_config_from(parser.parse_args([]))
    assert (cfg.kernels, cfg.gemv) == ("torch", "cublas")


def test_cpu_threads_reach_the_engine_config_and_a_child_worker():
    import argparse

    from tokenq.engine_options import add_engine_flags, engine_config_from, engine_flags_argv

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    default = parser.parse_args([])
    assert engine_config_from(default).cpu_threads is None and "--cpu-threads" not in engine_flags_argv(default)
    args = parser.parse_args(["--cpu-threads", "3"])
    assert engine_config_from(args).cpu_threads == 3
    assert engine_config_from(parser.parse_args(engine_flags_argv(args))).cpu_threads == 3
    with pytest.raises(ValueError, match="--cpu-threads must be at least 1"):
        engine_config_from(parser.parse_args(["--cpu-threads", "-1"]))


def test_latency_guard_flags_reach_the_engine_config_and_a_child_worker():
    import argparse

    from tokenq.engine_options import add_engine_flags, engine_config_from, engine_flags_argv

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    default = engine_config_from(parser.parse_args([]))
    assert (default.latency_guard_s, default.guarded_prefill_tokens) == (1.0, 1024)
    args = parser.parse_args(["--latency-guard-s", "0", "--guarded-prefill-tokens", "256"])
    child = engine_config_from(parser.parse_args(engine_flags_argv(args)))
    assert (child.latency_guard_s, child.guarded_prefill_tokens) == (0.0, 256)
    with pytest.raises(ValueError, match="--latency-guard-s must be at least 0"):
        engine_config_from(parser.parse_args(["--latency-guard-s", "-1"]))
    with pytest.raises(ValueError, match="--guarded-prefill-tokens must be at least 1"):
        engine_config_from(parser.parse_args(["--guarded-prefill-tokens", "0"]))


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
    (["--max-num-batched-tokens", "-5"], "--max-num-batched-tokens must be at least 1, got -5"),
    (["--max-model-len", "0"], "--max-model-len must be at least 1, got 0"),
    (["--block-size", "0"], "--block-size must be at least 1, got 0"),
    (["--kv-cache-gb", "0"], "--kv-cache-gb must be more than 0, got 0.0"),
    (["--kv-cache-gb", "nan"], "--kv-cache-gb must be more than 0, got nan"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be more than 0 and at most 1"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be at least 1, got 0"),
    (["--device", "gpu"], "--device must be cpu or cuda"),
    (["--dtype", "fp16"], "--dtype must be float32 or bfloat16 or float16, got 'fp16'"),
])
def test_an_engine_flag_out_of_range_is_named(argv, message):
    """Each of these started a worker that loaded its model and then never scheduled, refused every
    request or failed deep inside; now the start stops with the flag's name."""
    import argparse

    from tokenq.engine_options import OptionError, add_engine_flags, engine_config_from
    from worker.engine.config import ConfigError, EngineConfig

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    with pytest.raises(OptionError) as e:
        engine_config_from(parser.parse_args(argv))
    assert str(e.value).startswith(message)
    with pytest.raises(ConfigError) as direct:
        EngineConfig(max_num_seqs=0)
    assert direct.value.field == "max_num_seqs"


def test_an_engine_process_sets_its_kernels_from_its_config(monkeypatch):
    pytest.importorskip("torch")
    from tokenq_kernels import dispatch, gemv
    from worker.engine.config import EngineConfig
    from worker.engine.kernel_choice import select_kernels

    monkeypatch.setattr(dispatch, "_triton_on", dispatch.HAS_TRITON)  # put back afterwards
    monkeypatch.setattr(gemv, "ENABLED", True)
    cuda = type("FakeCuda", (), {"is_cuda": True})()
    select_kernels(EngineConfig(kernels="torch", gemv="cublas"))
    assert not dispatch.use_triton(cuda) and not gemv.ENABLED
    select_kernels(EngineConfig())
    assert dispatch.use_triton(cuda) == dispatch.HAS_TRITON and gemv.ENABLED
    with pytest.raises(ValueError, match="kernels"):
        EngineConfig(kernels="cuda")


def test_engine_model_and_kernel_code_read_no_environment():
    """Options reach the engine through its config; kernels import nothing above them."""
    root = Path(__file__).resolve().parents[2]
    for folder in ("tokenq_kernels", "worker/engine", "worker/layers", "worker/models"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "os.environ" not in text and "getenv" not in text, path
            if folder == "tokenq_kernels":
                assert not re.search(r"^\s*(from|import) (worker|tokenq)\b", text, re.MULTILINE), path


def test_the_hot_loop_is_on_for_a_gpu_host_with_cores_to_spare(monkeypatch):
    import os

    from tokenq import flag_checks
    from tokenq.settings import HOT_LOOP_MIN_CORES, hot_loop_env

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(HOT_LOOP_MIN_CORES)))
    monkeypatch.setattr(flag_checks, "cuda_available", lambda: True)
    assert hot_loop_env("cuda", {}) == {"TOKENQ_HOT_LOOP": "1"}
    assert hot_loop_env("cuda:1", {}) == {"TOKENQ_HOT_LOOP": "1"}
    assert hot_loop_env("auto", {}) == {"TOKENQ_HOT_LOOP": "1"}
    assert hot_loop_env("cpu", {}) == {}  # the engine takes every core
    assert hot_loop_env("cuda", {"TOKENQ_HOT_LOOP": "0"}) == {}  # the user's setting stands
    monkeypatch.setattr(flag_checks, "cuda_available", lambda: False)
    assert hot_loop_env("auto", {}) == {}
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(HOT_LOOP_MIN_CORES - 1)))
    assert hot_loop_env("cuda", {}) == {}  # no cores to spare: two polling loops would slow every request
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS has none: the machine's core count decides
    monkeypatch.setattr(os, "cpu_count", lambda: HOT_LOOP_MIN_CORES)
    assert hot_loop_env("cuda", {}) == {"TOKENQ_HOT_LOOP": "1"}
