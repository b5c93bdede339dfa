"""The engine at two gloo ranks on the CPU gives the one-rank engine's prompt logprobs (completions' echo)
and sampled logprobs. Each prompt-logprob slice runs the vocabulary-parallel LM head, whose gather needs
every rank: a rank that skipped it would leave rank 0 waiting forever, so the two-rank run has a deadline."""

from __future__ import annotations

import queue
import time

import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as tmp  # noqa: E402

from protocol.sampling import SamplingParams  # noqa: E402

DEADLINE_S = 120  # start-up of two spawned ranks on a loaded 2-core box included (the run takes ~40 s there)
TOP = 3
PROMPTS = [[(7 * i + 3) % 512 for i in range(37)], [(11 * i + 5) % 512 for i in range(9)],
           [(13 * i + 1) % 512 for i in range(21)]]
ECHO = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=TOP, logprobs=TOP, ignore_eos=True)
PLAIN = SamplingParams(max_tokens=6, temperature=0.0, logprobs=TOP, ignore_eos=True)
PARAMS = [ECHO, PLAIN, ECHO]
SLICE_ROWS = 4  # several head slices per chunk: their order must agree over the ranks


def _plain(lp) -> tuple | None:
    return None if lp is None else (lp.token_id, lp.logprob, [tuple(t) for t in lp.top])


def _outputs(path: str, tp: int) -> list[dict]:
    """Greedy tokens, their logprobs and the prompt logprobs of PROMPTS, as plain values."""
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    # A small step budget chunks the prefills, so prompt-logprob slices meet decodes and other chunks.
    engine = LLMEngine(path, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
                                          max_num_batched_tokens=16, max_model_len=128, tensor_parallel_size=tp))
    try:
        outs = engine.generate(PROMPTS, PARAMS)
    finally:
        engine.close()
    return [{"tokens": o.new_token_ids, "logprobs": [_plain(lp) for lp in o.logprobs],
             "prompt": None if o.prompt_logprobs is None else [_plain(lp) for lp in o.prompt_logprobs]}
            for o in outs]


def _tp2_main(path: str, results) -> None:
    from worker.engine import prompt_logprobs

    prompt_logprobs.ROWS_PER_SLICE = SLICE_ROWS
    results.put(_outputs(path, tp=2))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from worker.models.random_weights import write_random_model_dir

    return write_random_model_dir("tiny", tmp_path_factory.mktemp("tiny"))


def _run_tp2(path: str) -> list[dict]:
    ctx = tmp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_tp2_main, args=(path, results))
    proc.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline:
            try:
                return results.get(timeout=1)
            except queue.Empty:
                assert proc.is_alive() or not results.empty(), "the two-rank engine failed (its traceback is above)"
        pytest.fail(f"the two-rank engine gave nothing in {DEADLINE_S} s: a collective that one rank skipped hangs")
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()  # its rank 1 follows (it exits with its parent)
            proc.join(10)


def test_two_ranks_give_one_ranks_logprobs(tiny_model_dir, monkeypatch):
    from worker.engine import prompt_logprobs

    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_SLICE", SLICE_ROWS)
    path = str(tiny_model_dir)
    one = _outputs(path, tp=1)
    two = _run_tp2(path)
    assert [o["prompt"] is None for o in one] == [False, True, False]
    for a, b in zip(one, two, strict=True):
        assert b["tokens"] == a["tokens"]
        assert (a["prompt"] is None) == (b["prompt"] is None)
        pairs = list(zip(a["logprobs"], b["logprobs"], strict=True))
        if a["prompt"] is not None:
            assert a["prompt"][0] is None and b["prompt"][0] is None
            pairs += list(zip(a["prompt"][1:], b["prompt"][1:], strict=True))
        for x, y in pairs:
            assert y[0] == x[0]
            assert y[1] == pytest.approx(x[1], abs=1e-4)
            assert [t for t, _ in y[2]] == [t for t, _ in x[2]]
            assert [v for _, v in y[2]] == pytest.approx([v for _, v in x[2]], abs=1e-4)
