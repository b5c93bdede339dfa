"""The model runner's flattened step inputs (built with numpy from per-sequence values) against a plain
per-token construction, and the padded decode batches of the CUDA-graph path run eagerly on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.sampling import SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.cuda_graphs import fastest_buckets, graph_batch_sizes, prefill_token_buckets
from worker.engine.llm_engine import LLMEngine
from worker.engine.model_runner import ModelRunner
from worker.engine.scheduler import ScheduledSeq, SchedulerOutput
from worker.engine.sequence import Sequence
from worker.models.random_weights import random_model, shape_config

BS = 4


@pytest.fixture(scope="module")
def tiny():
    return random_model(shape_config("tiny"), torch.float32, "cpu", seed=3)


def _seq(name: str, n_tokens: int, computed: int, blocks: list[int]) -> Sequence:
    seq = Sequence(name, list(range(100, 100 + n_tokens)), SamplingParams())
    seq.num_computed_tokens = computed
    seq.block_table = list(blocks)
    return seq


def _expected(items: list[ScheduledSeq]) -> dict[str, list[int]]:
    """Per token, the obvious way."""
    out: dict[str, list[int]] = {"ids": [], "pos": [], "slots": [], "qsl": [0], "lens": [], "logits": []}
    for it in items:
        s, n = it.seq, it.num_new_tokens
        for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
            out["ids"].append(s.token_ids[p])
            out["pos"].append(p)
            out["slots"].append(s.block_table[p // BS] * BS + p % BS)
        out["qsl"].append(out["qsl"][-1] + n)
        out["lens"].append(s.num_computed_tokens + n)
        if it.samples:
            out["logits"].append(out["qsl"][-1] - 1)
    return out


def test_prepare_matches_per_token_construction(tiny):
    model, mcfg = tiny
    cfg = EngineConfig(block_size=BS, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64,
                       enforce_eager=True)
    runner = ModelRunner(model, mcfg, cfg, torch.float32, torch.device("cpu"), max_model_len=64)
    steps = [
        [  # two decodes, a prefill chunk that samples, a chunk that does not, one after a prefix hit
            ScheduledSeq(_seq("d1", 7, 6, [5, 9]), 1),
            ScheduledSeq(_seq("d2", 13, 12, [1, 2, 3, 4]), 1),
            ScheduledSeq(_seq("p1", 10, 0, [7, 8, 11]), 10),
            ScheduledSeq(_seq("p2", 20, 4, [12, 13, 14, 15, 16]), 6),
            ScheduledSeq(_seq("hit", 9, 8, [20, 21, 22]), 1),
        ],
        [ScheduledSeq(_seq("only", 3, 0, [30]), 3)],  # fewer and shorter rows than the step before
    ]
    for items in steps:
        x = runner.prepare(SchedulerOutput(items, [], sum(i.num_new_tokens for i in items)))
        exp = _expected(items)
        assert x.input_ids.tolist() == exp["ids"]
        assert x.positions.tolist() == exp["pos"]
        assert x.meta.slot_mapping.tolist() == exp["slots"]
        assert x.meta.query_start_loc.tolist() == exp["qsl"] == x.meta.query_start_loc_cpu
        assert x.meta.seq_lens.tolist() == exp["lens"] == x.meta.seq_lens_cpu
        assert x.logits_indices.tolist() == exp["logits"]
        assert [s.request_id for s in x.sampling_seqs] == [i.seq.request_id for i in items if i.samples]
        for row, it in enumerate(items):
            table = it.seq.block_table
            assert x.meta.block_tables[row, : len(table)].tolist() == table
        assert x.meta.max_seq_len == max(exp["lens"])
        assert x.meta.num_decodes == (2 if len(items) > 1 else 0)
        assert x.graph_batch is None


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(100)[-3:] == [88, 96, 100]
    sizes = graph_batch_sizes(1024)
    assert sizes[-1] == 512 and all(b % 8 == 0 for b in sizes[3:])


def _engine(tiny, eager: bool, **kw) -> LLMEngine:
    model, mcfg = tiny
    cfg = EngineConfig(block_size=BS, num_kv_blocks=512, max_num_seqs=12, max_num_batched_tokens=96,
                       max_model_len=96, enforce_eager=eager, **kw)
    return LLMEngine.from_model(model, mcfg, cfg)


def test_padded_decode_batches_equal_eager(tiny):
    """enforce_eager=False on a CPU runs decode steps padded to their bucket (scratch block, seq_len 1):
    the padding must change no token, at batch sizes that hit a bucket exactly and that do not."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, size=int(n)).tolist() for n in rng.integers(5, 40, size=11)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    eager = _engine(tiny, True)
    padded = _engine(tiny, False)
    assert eager.runner.graphs is None and padded.runner.graphs is not None
    buckets: list[int] = []
    run = padded.runner.graphs.run

    def spy(b: int):
        buckets.append(b)
        return run(b)

    padded.runner.graphs.run = spy
    a = eager.generate(prompts, params)
    b = padded.generate(prompts, params)
    assert [o.new_token_ids for o in a] == [o.new_token_ids for o in b]
    assert all(len(o.new_token_ids) == 12 for o in b)
    assert 12 in buckets  # 11 decodes padded to the bucket of 12


def test_padded_decode_logits_equal_eager(tiny):
    """The same step, padded or not: logits of the real rows agree to float32 rounding."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 512, size=int(n)).tolist() for n in (9, 17, 30)]
    logits = []
    for eager in (True, False):
        engine = _engine(tiny, eager)
        captured = []
        sample = engine.runner.sampler.sample

        def keep(lg, batch, sample=sample, captured=captured):
            captured.append(lg.clone())
            return sample(lg, batch)

        engine.runner.sampler.sample = keep
        engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        logits.append(torch.cat(captured))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_prefill_token_buckets():
    assert prefill_token_buckets(8) == []
    assert prefill_token_buckets(16) == [16]
    assert prefill_token_buckets(96) == [16, 32, 64, 96]
    assert prefill_token_buckets(2048)[-3:] == [896, 960, 1024]


def test_padded_prefill_chunks_equal_eager(tiny):
    """enforce_eager=False on a CPU runs a step that is one prefill chunk alone padded to its token bucket
    (padding rows at the scratch block, outside the sequence's queries): the padding must change no logit.
    Requests one at a time, so that each prefill is alone: short prompts, one exactly a bucket, one longer
    than the step budget (chunked: its chunks are alone too), and a repeat that starts from cached blocks."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 512, size=n).tolist() for n in (5, 17, 32, 50, 150)]
    prompts.append(prompts[3][:40] + [7, 8, 9])  # starts from the prefix cache (a bucket of 16 for the rest)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    runs = []
    model, mcfg = tiny
    for eager in (True, False):
        engine = LLMEngine.from_model(model, mcfg, EngineConfig(
            block_size=BS, num_kv_blocks=512, max_num_seqs=4, max_num_batched_tokens=96, max_model_len=256,
            enforce_eager=eager))
        captured: list[torch.Tensor] = []
        sample = engine.runner.sampler.sample

        def keep(lg, batch, sample=sample, captured=captured):
            captured.append(lg.clone())
            return sample(lg, batch)

        engine.runner.sampler.sample = keep
        buckets: list[int] = []
        if not eager:
            run = engine.runner.prefill_graphs.run
            engine.runner.prefill_graphs.run = lambda t, meta, run=run, seen=buckets: (seen.append(t), run(t, meta))[1]
        tokens = [engine.generate([p], params)[0].new_token_ids for p in prompts]
        runs.append((tokens, torch.cat(captured), buckets, engine.stats()["prefix_hit_rate"]))
    (tok_e, log_e, _, hits_e), (tok_p, log_p, buckets, hits_p) = runs
    assert tok_e == tok_p and all(len(t) == 3 for t in tok_p)
    torch.testing.assert_close(log_e, log_p, rtol=1e-4, atol=1e-4)
    # 5, 17, 32, 50 tokens; 150 = 96 + 54; the repeat's uncached tail.
    assert buckets == [16, 32, 32, 64, 96, 64, 16]
    assert hits_e == hits_p > 0


def test_fastest_buckets_drop_a_bucket_that_a_larger_one_beats():
    """Replay times as measured on an H200 around a slow shape: 448 rows ran slower than 456 and 512."""
    times = {440: 10.7, 448: 14.4, 456: 10.5, 464: 11.1, 512: 11.9}
    assert fastest_buckets(times) == [440, 456, 464, 512]
    assert fastest_buckets({8: 4.2, 16: 4.3, 24: 4.3}) == [8, 16, 24]  # rising times: all kept
    assert fastest_buckets({8: 4.40, 16: 4.35}) == [8, 16]  # within the tolerance: kept
    assert fastest_buckets({8: 5.0, 16: 4.0, 24: 6.0}) == [16, 24]  # the largest always stays
    assert fastest_buckets({1: 3.0}) == [1]
