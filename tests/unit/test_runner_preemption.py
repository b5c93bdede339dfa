"""A thousand concurrent requests on a KV cache that holds a few dozen: the scheduler preempts (by
recompute) instead of failing, and every request finishes with all its tokens."""

from __future__ import annotations

import numpy as np
import torch

from protocol.sampling import SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.models.random_weights import random_model, shape_config


def test_thousand_requests_on_few_blocks_all_finish():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    try:
        _thousand_requests()
    finally:
        torch.set_num_threads(threads)


def _thousand_requests() -> None:
    model, mcfg = random_model(shape_config("tiny"), torch.float32, "cpu", seed=5)
    # 48 blocks of 8 tokens: about 16 sequences at their longest; max_num_seqs lets 64 try.
    cfg = EngineConfig(block_size=8, num_kv_blocks=48, max_num_seqs=64, max_num_batched_tokens=256,
                       max_model_len=64)
    engine = LLMEngine.from_model(model, mcfg, cfg)
    preempted = 0
    preempt = engine.scheduler._preempt

    def counting(seq):
        nonlocal preempted
        preempted += 1
        preempt(seq)

    engine.scheduler._preempt = counting
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, size=int(n)).tolist() for n in rng.integers(4, 17, size=1000)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(outs) == 1000
    assert all(o.finished and o.finish_reason == "length" and len(o.new_token_ids) == 6 for o in outs)
    assert preempted > 0
    assert engine.block_manager.num_free_blocks == 48  # nothing leaked
