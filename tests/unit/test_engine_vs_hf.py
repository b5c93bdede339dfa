"""With temperature 0 our engine's tokens equal transformers' `generate` (float32, same weights): all at
once, arriving one by one while others are mid-generation, and with prefix-cache hits."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from protocol.sampling import SamplingParams  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one paragraph.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What does a compiler do?",
    "Summarize the plot of Romeo and Juliet.",
    "How many legs does a spider have?",
    "Write a Python function that reverses a string.",
    "What is 17 times 23?",
    "Name the planets of the solar system.",
    "What is the difference between weather and climate?",
    "Tell me a short joke about computers.",
    "Describe a cat to someone who has never seen one.",
    "What causes earthquakes?",
    "Suggest a name for a bakery.",
    "How do vaccines work?",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Écris une phrase en français sur le café ☕.",
    "用一句话介绍长城。",
]


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def prompts(default_model_dir) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    out = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        out.append(list(ids))
    return out


@pytest.fixture(scope="module")
def expected(hf_model, prompts) -> list[list[int]]:
    """transformers' greedy continuation of each prompt alone (no padding), up to EOS or NEW_TOKENS."""
    res = []
    with torch.inference_mode():
        for p in prompts:
            out = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, do_sample=False)
            res.append(out[0, len(p):].tolist())
    return res


@pytest.fixture(scope="module")
def engine(default_model_dir) -> LLMEngine:
    # A small token budget forces chunked prefills mixed with decodes.
    return LLMEngine(default_model_dir, EngineConfig(max_num_batched_tokens=256, num_kv_blocks=600))


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)


def _run_all(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return [o.new_token_ids for o in engine.generate(prompts, GREEDY)]


def test_at_least_20_prompts(prompts):
    assert len(prompts) >= 20


def test_greedy_equals_transformers_all_at_once(engine, prompts, expected):
    got = _run_all(engine, prompts)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"prompt {i} ({QUESTIONS[i]!r}) diverged"
    assert sum(len(e) for e in expected) > 20 * 32  # real generations, not instant EOS


def test_greedy_equals_transformers_arriving_mid_generation(engine, prompts, expected):
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    engine.block_manager.reset_prefix_cache()
    step = 0
    while pending or engine.has_unfinished_requests():
        # A new prompt joins every third step, while the earlier ones are mid-generation.
        if pending and step % 3 == 0:
            i, p = pending.pop(0)
            engine.add_request(f"late-{i}", p, GREEDY)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    for i, e in enumerate(expected):
        assert got[f"late-{i}"] == e, f"prompt {i} diverged when arriving late"


def test_greedy_equals_transformers_with_prefix_cache_hits(engine, prompts, expected):
    _run_all(engine, prompts)  # fills the prefix cache
    hits_before = engine.block_manager.prefix_hit_tokens
    outs = engine.generate(prompts, GREEDY)
    assert engine.block_manager.prefix_hit_tokens > hits_before
    assert sum(o.num_cached_tokens for o in outs) > 0
    for i, (o, e) in enumerate(zip(outs, expected, strict=True)):
        assert o.new_token_ids == e, f"prompt {i} diverged with a prefix-cache hit"
