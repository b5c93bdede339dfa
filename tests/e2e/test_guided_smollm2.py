"""Structured outputs with the real default model on the CPU: 50 chat prompts under JSON schemas (nested
objects, arrays, enums, bounded strings and integers), run in one batch through the engine, all give JSON
that validates against its schema."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from protocol.guided import GuidedSpec  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "category": {"enum": ["fruit", "animal", "tool", "city", "other"]},
        "details": {
            "type": "object",
            "properties": {"size": {"enum": ["small", "medium", "large"]},
                           "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
            "required": ["size", "rating"], "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "old", "new"]},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "category", "details", "tags"], "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "first_name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                     "country": {"enum": ["US", "UK", "FR", "DE", "other"]}},
                    "required": ["city", "country"], "additionalProperties": False},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["first_name", "age", "address", "languages", "employed"], "additionalProperties": False,
}
SUBJECTS = ["an apple", "a hammer", "Paris", "a tiger", "a banana", "a screwdriver", "London", "a dolphin",
            "a cherry", "a wrench", "Tokyo", "an eagle", "a lemon", "a saw", "Berlin", "a horse", "a grape",
            "a drill", "Rome", "a rabbit", "a mango"]
PEOPLE = ["a retired teacher from Ohio", "a young French chef", "a German engineer", "a British nurse",
          "a student who speaks three languages", "an unemployed painter", "a doctor in Boston",
          "a Spanish football coach"]


def prompts() -> list[tuple[str, dict]]:
    out = []
    for i in range(50):
        if i % 2 == 0:
            out.append((f"Describe {SUBJECTS[i // 2 % len(SUBJECTS)]} as a JSON object with name, category, "
                        "details (size, rating 1-5) and tags.", ITEM))
        else:
            out.append((f"Invent {PEOPLE[i // 2 % len(PEOPLE)]} and describe them as JSON.", PERSON))
    return out


@pytest.mark.timeout(1800)  # about 70 steps of 50 sequences on the CPU: minutes on two shared cores
def test_fifty_prompts_under_json_schemas_all_validate(default_model_dir):
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(default_model_dir, EngineConfig(max_model_len=512, max_num_seqs=64, kv_cache_memory_gb=0.5))
    tok = engine.tokenizer
    cases = prompts()
    ids = [tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids for q, _ in cases]
    params = [SamplingParams(max_tokens=96, temperature=0.0, guided=GuidedSpec(json_schema=schema))
              for _, schema in cases]
    outs = engine.generate(ids, params)
    bad = []
    for (question, schema), out in zip(cases, outs, strict=True):
        try:
            jsonschema.validate(json.loads(out.text_delta), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append((question, out.finish_reason, out.text_delta, str(e)[:200]))
    assert not bad, f"{len(bad)} of {len(cases)} outputs do not validate: {bad[:3]}"
    assert all(o.finish_reason == "stop" for o in outs)
    assert engine.guided is not None and engine.guided.cache.compiled == 2  # two schemas, compiled once each
