"""Prompt logprobs (completions' echo with logprobs) against Hugging Face transformers on a tiny random
Llama: chunked prefill, a batch that mixes them with ordinary requests, and a prompt whose prefix is cached."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from protocol.sampling import SamplingParams  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.models.loader import load_model  # noqa: E402

TOP = 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(11)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return path, hf


def engine_of(path, **config) -> LLMEngine:
    model, cfg = load_model(path, torch.float32, "cpu")
    return LLMEngine.from_model(model, cfg, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64,
                                                         block_size=4, **config))


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_matches(hf, prompt: list[int], got: list) -> None:
    ref = hf_prompt_logprobs(hf, prompt)
    assert got[0] is None and len(got) == len(prompt)
    for pos, lp in enumerate(got[1:], start=1):
        assert lp.token_id == prompt[pos]
        assert lp.logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4), pos
        vals, ids = ref[pos - 1].topk(TOP)
        assert [t for t, _ in lp.top] == ids.tolist(), pos
        assert [v for _, v in lp.top] == pytest.approx(vals.tolist(), abs=1e-4)


PROMPTS = [[(7 * i + 3) % 512 for i in range(37)], [(11 * i + 5) % 512 for i in range(9)]]
ECHO = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP, logprobs=TOP)


def test_prompt_logprobs_match_transformers_over_chunked_prefill(hf_dir):
    path, hf = hf_dir
    engine = engine_of(path, max_num_batched_tokens=8)  # the 37-token prompt takes five chunks
    outs = engine.generate(PROMPTS, ECHO)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert_matches(hf, prompt, out.prompt_logprobs)
        # The one generated token's logprob continues the same distribution.
        ref = hf_prompt_logprobs(hf, prompt)[-1]
        assert out.new_token_ids == [int(ref.argmax())]
        assert out.logprobs[0].logprob == pytest.approx(ref.max().item(), abs=1e-4)


def test_only_the_requests_that_ask_get_them_in_a_mixed_batch(hf_dir):
    path, hf = hf_dir
    engine = engine_of(path, max_num_batched_tokens=16)
    plain = SamplingParams(max_tokens=5, temperature=0.0)
    outs = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0]], [plain, ECHO, plain])
    assert outs[0].prompt_logprobs is None and outs[2].prompt_logprobs is None
    assert_matches(hf, PROMPTS[1], outs[1].prompt_logprobs)
    alone = engine_of(path).generate([PROMPTS[0]], plain)[0]
    assert outs[0].new_token_ids == alone.new_token_ids


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(hf_dir):
    path, hf = hf_dir
    engine = engine_of(path, max_num_batched_tokens=64)
    engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0.0))  # fills the prefix cache
    again = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0.0))[0]
    assert again.num_cached_tokens > 0  # the cache does hit for an ordinary request
    [out] = engine.generate([PROMPTS[0]], ECHO)
    assert out.num_cached_tokens == 0
    assert_matches(hf, PROMPTS[0], out.prompt_logprobs)


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(hf_dir):
    path, hf = hf_dir
    engine = engine_of(path, max_num_batched_tokens=8)
    score_only = SamplingParams(max_tokens=0, prompt_logprobs=0, logprobs=0)
    plain = SamplingParams(max_tokens=3, temperature=0.0)
    outs = engine.generate([PROMPTS[0], PROMPTS[1]], [score_only, plain])
    assert outs[0].new_token_ids == [] and outs[0].finish_reason == "length" and outs[0].num_output_tokens == 0
    ref = hf_prompt_logprobs(hf, PROMPTS[0])
    assert [lp.logprob for lp in outs[0].prompt_logprobs[1:]] == pytest.approx(
        [ref[p - 1, PROMPTS[0][p]].item() for p in range(1, len(PROMPTS[0]))], abs=1e-4)
    assert len(outs[1].new_token_ids) == 3
    assert not engine.has_unfinished_requests()
