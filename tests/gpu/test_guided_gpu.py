"""Guided decoding on a GPU: a batch of constrained and free requests through CUDA-graph decodes; every
constrained output is JSON that validates against its schema, and the free ones are what they are alone
(up to a near tie: another batch shape rounds differently).
A random-weight model over the benchmark's synthetic vocabulary (tokenq/bench/guided.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from protocol.guided import GuidedSpec  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402
from tests.asserts import assert_agree_until_near_tie  # noqa: E402
from tokenq.bench.guided import synthetic_guided_decoding, synthetic_vocabulary  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.models.random_weights import random_model, shape_config  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["invoice", "receipt", "order"]},
    "paid": {"type": "boolean"},
    "code": {"type": "string", "maxLength": 8},
    "lines": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9},
                                         "unit": {"enum": ["kg", "pcs"]}},
        "required": ["qty", "unit"], "additionalProperties": False}}},
    "required": ["kind", "paid", "code", "lines"], "additionalProperties": False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_constrained_batch_on_cuda_validates_and_leaves_free_rows_alone():
    config = shape_config("small")
    vocab = config["vocab_size"]
    model, model_cfg = random_model(config, torch.bfloat16, "cuda", seed=11)
    engine = LLMEngine.from_model(model, model_cfg, EngineConfig(device="cuda", dtype="bfloat16",
                                                                 max_model_len=1024, max_num_seqs=64))
    assert engine.runner.graphs is not None  # decode steps replay CUDA graphs; masks apply after them
    engine.guided = synthetic_guided_decoding(vocab, seed=0)
    pieces = synthetic_vocabulary(vocab, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, int(k)).tolist() for k in rng.integers(8, 200, 48)]
    guided = [SamplingParams(max_tokens=200, temperature=t, seed=i, guided=GuidedSpec(json_schema=SCHEMA))
              for i, t in enumerate([0.0, 0.8] * 16)]
    free = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = engine.generate(prompts, guided + [free] * 16)
    for out in outs[:32]:
        assert out.finish_reason == "stop", out
        text = b"".join(pieces[t] for t in out.new_token_ids[:-1]).decode()  # the last is the stop token
        jsonschema.validate(json.loads(text), SCHEMA)
    alone = engine.generate(prompts[32:], free)
    for i, (mixed, own) in enumerate(zip(outs[32:], alone, strict=True)):
        assert len(mixed.new_token_ids) == len(own.new_token_ids) == 40
        assert_agree_until_near_tie(f"free request {i}", own, mixed)
