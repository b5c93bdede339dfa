"""Guided decoding in the engine: masks on a toy vocabulary, the grammar cache, the sampler's masked rows,
and constrained requests through the engine's overlapped steps (a random-weight model, SmolLM2's tokenizer)."""

from __future__ import annotations

import json
import re

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from protocol.guided import GuidedSpec  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402
from worker.engine.guided import GrammarCache, GrammarError, GuidedDecoding, apply_token_bitmask  # noqa: E402
from worker.engine.sampler import Sampler, SamplingBatch  # noqa: E402

# A toy vocabulary: single characters, a few words, an end-of-text token (id 9), a control character.
TOY = ["a", "b", "c", "ab", "yes", "no", "{", "}", '"', "</s>", "\x01"]
EOS = 9


def toy_info() -> xgr.TokenizerInfo:
    return xgr.TokenizerInfo(TOY, xgr.VocabType.RAW, vocab_size=len(TOY), stop_token_ids=[EOS])


def allowed(decoding: GuidedDecoding, state) -> set[int]:
    logits = torch.zeros(1, len(TOY))
    mask, rows = decoding.mask([state], [0], torch.device("cpu"))
    apply_token_bitmask(logits, rows, mask)
    return {i for i in range(len(TOY)) if logits[0, i] == 0}


def test_mask_follows_the_grammar_and_allows_the_stop_only_where_it_may_end():
    d = GuidedDecoding(toy_info, len(TOY))
    state = d.start(GuidedSpec(regex="ab+c?"))
    assert allowed(d, state) == {0, 3}  # "a" or "ab"
    state.advance([0], lambda: -1)
    assert allowed(d, state) == {1}  # "b"; no stop yet
    state.advance([0, 1], lambda: -1)
    assert allowed(d, state) == {1, 2, EOS}  # more b, a c, or the end
    state.advance([0, 1, EOS], lambda: -1)
    assert state.terminated and not state.wants_mask and state.error is None


@pytest.mark.parametrize("schema", [{"type": "string"}, {"type": "string", "maxLength": 4}])
def test_json_strings_never_take_a_raw_control_character(schema):
    d = GuidedDecoding(toy_info, len(TOY))
    state = d.start(GuidedSpec(json_schema=schema))
    state.advance([8], lambda: -1)  # the opening quote
    assert {0, 1, 8} <= allowed(d, state) and 10 not in allowed(d, state)


def test_a_token_outside_the_grammar_is_an_error_of_that_request():
    d = GuidedDecoding(toy_info, len(TOY))
    state = d.start(GuidedSpec(choice=["yes", "no"]))
    state.advance([0], lambda: -1)  # "a"
    assert state.error and "breaks the output constraint" in state.error and not state.wants_mask


def test_stand_in_tokens_are_read_from_the_step_in_flight():
    d = GuidedDecoding(toy_info, len(TOY))
    state = d.start(GuidedSpec(choice=["yes", "no"]))
    state.advance([-1], lambda: 5)  # the sample of the step in flight: "no"
    assert state.accepted == 1 and allowed(d, state) == {EOS}


def test_mask_touches_only_the_constrained_rows():
    d = GuidedDecoding(toy_info, len(TOY))
    state = d.start(GuidedSpec(choice=["yes", "no"]))
    logits = torch.randn(3, len(TOY))
    before = logits.clone()
    mask, rows = d.mask([state], [1], torch.device("cpu"))
    apply_token_bitmask(logits, rows, mask)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    keep = logits[1] > -float("inf")
    assert keep.nonzero().flatten().tolist() == [4, 5]
    assert torch.equal(logits[1][keep], before[1][keep])


def test_grammar_cache_compiles_once_per_constraint_and_stays_bounded():
    cache = GrammarCache(toy_info(), capacity=2)
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"enum": ["x"]}}}
    g1 = cache.get(GuidedSpec(json_schema=schema))
    g2 = cache.get(GuidedSpec(json_schema=dict(reversed(schema.items()))))  # the same schema, keys reordered
    assert g1 is g2 and cache.compiled == 1
    cache.get(GuidedSpec(regex="a+"))
    cache.get(GuidedSpec(choice=["yes"]))  # a third: the least recently used (the schema) goes
    assert len(cache) == 2 and cache.compiled == 3
    cache.get(GuidedSpec(json_schema=schema))
    assert cache.compiled == 4


@pytest.mark.parametrize("spec, needle", [
    (GuidedSpec(regex="(a"), "constraint (regex) does not compile"),
    (GuidedSpec(grammar="root ::= undefined_rule"), "constraint (grammar) does not compile: EBNF parser error"),
    (GuidedSpec(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
     "constraint (json_schema) does not compile"),
])
def test_a_constraint_that_does_not_compile_is_a_grammar_error_naming_it(spec, needle):
    with pytest.raises(GrammarError, match=re.escape(needle)):
        GrammarCache(toy_info()).get(spec)


def test_a_constraint_that_admits_no_output_is_refused_at_its_start():
    decoding = GuidedDecoding(toy_info, len(TOY))
    with pytest.raises(GrammarError, match=re.escape("(json_schema) admits no output")):
        decoding.start(GuidedSpec(json_schema={"anyOf": [{"$ref": "#"}]}))
    assert decoding.start(GuidedSpec(choice=["yes"])).wants_mask


def test_sampler_masks_guided_rows_and_samples_the_rest_as_before():
    d = GuidedDecoding(toy_info, len(TOY))
    state = d.start(GuidedSpec(choice=["no"]))
    logits = torch.zeros(2, len(TOY))
    logits[:, 0] = 10.0  # "a" is everyone's favourite
    n = 2
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1)]
    mask, rows = d.mask([state], [1], torch.device("cpu"))
    batch = SamplingBatch(params, [[]] * n, [[]] * n, [None] * n, [set()] * n,
                          guided_rows=[1], guided_mask=mask, guided_index=rows)
    out = Sampler()(logits, batch)
    assert out.token_ids == [0, 5]
    assert batch.row(1).guided_rows == [0] and batch.row(0).guided_rows == []
    assert Sampler()(logits[1:], batch.row(1)).token_ids == [5]  # a row sampled apart keeps its mask


# ---- through the engine ----------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["kind", "ok", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from tokenizers import Tokenizer

    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.models.random_weights import random_model, shape_config

    tokenizer = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    config = shape_config("tiny", vocab_size=49152, eos_token_id=2)
    model, model_cfg = random_model(config, torch.float32, "cpu", seed=3)
    return LLMEngine.from_model(model, model_cfg, EngineConfig(device="cpu", dtype="float32",
                                                               kv_cache_memory_gb=0.05), tokenizer)


def test_engine_keeps_constrained_requests_in_their_grammar_and_the_others_as_they_were(engine):
    """A random model wanders anywhere; under a grammar every request ends, with "stop", inside it. The
    unconstrained requests in the same batch give the tokens they give alone."""
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(8)]
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    specs = [GuidedSpec(json_schema=SCHEMA), GuidedSpec(choice=["red", "green", "blue"]),
             GuidedSpec(regex="[0-9]{2}-[a-z]{3}"), GuidedSpec(json_schema=SCHEMA),
             GuidedSpec(choice=["only"])]
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=i, guided=s) for i, s in enumerate(specs)]
    outs = engine.generate(prompts, params + [free] * 3)
    for spec, out in zip(specs, outs, strict=False):
        assert out.finish_reason == "stop", (spec, out.text_delta)
        if spec.json_schema is not None:
            doc = json.loads(out.text_delta)
            assert doc["kind"] in ("cat", "dog") and isinstance(doc["ok"], bool) and len(doc["tags"]) <= 2
        elif spec.choice is not None:
            assert out.text_delta in spec.choice
        else:
            assert re.fullmatch(spec.regex, out.text_delta)
    alone = engine.generate(prompts[5:], free)
    assert [o.new_token_ids for o in outs[5:]] == [o.new_token_ids for o in alone]


def test_a_constraint_the_engine_cannot_compile_fails_at_add(engine):
    with pytest.raises(GrammarError):
        engine.add_request("bad", [1, 2, 3], SamplingParams(max_tokens=4, guided=GuidedSpec(grammar="root ::= x")))
    assert not engine.has_unfinished_requests()


def test_each_choice_of_a_guided_request_walks_the_grammar_on_its_own(engine):
    """n=3 under one constraint: every choice ends, with "stop", inside the grammar. The choices sample apart
    (they differ), so a matcher shared by the request would be fed the tokens of all three and fail."""
    regex = GuidedSpec(regex="[a-z]{6}-[0-9]{3}")
    choice = GuidedSpec(choice=["red", "green", "blue", "yellow", "purple", "orange"])
    schema = GuidedSpec(json_schema=SCHEMA)
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=7, n=3, guided=s) for s in (regex, choice, schema)]
    by_prompt = engine.generate_choices([[11, 12, 13], [14, 15, 16], [17, 18, 19]], params)
    regex_out, choice_out, schema_out = by_prompt
    for outs in by_prompt:
        assert [o.index for o in outs] == [0, 1, 2]
        assert all(o.finish_reason == "stop" for o in outs), [(o.finish_reason, o.text_delta) for o in outs]
    assert all(re.fullmatch(regex.regex, o.text_delta) for o in regex_out), [o.text_delta for o in regex_out]
    assert len({o.text_delta for o in regex_out}) > 1  # the choices went their own ways
    assert all(o.text_delta in choice.choice for o in choice_out), [o.text_delta for o in choice_out]
    for o in schema_out:
        doc = json.loads(o.text_delta)
        assert doc["kind"] in ("cat", "dog") and isinstance(doc["ok"], bool) and len(doc["tags"]) <= 2
    assert not engine.has_unfinished_requests()
