"""The model runner on a GPU: profiled KV cache, CUDA-graph decodes, Triton kernels, against transformers
on the very same random weights (shared tensors, see worker/models/random_weights.py)."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

from protocol.sampling import SamplingParams  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.engine.scheduler import ScheduledSeq, SchedulerOutput  # noqa: E402
from worker.engine.sequence import Sequence  # noqa: E402
from worker.layers.context import set_attention_metadata  # noqa: E402
from worker.models.random_weights import hf_peer, random_model, shape_config  # noqa: E402

CUDA = "cuda"
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _prompts(n: int, vocab: int, seed: int, lo: int = 5, hi: int = 300) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(k)).tolist() for k in rng.integers(lo, hi, size=n)]


@pytest.fixture(autouse=True)
def free_gpu_memory():
    """Engines of earlier tests must not hold KV caches or graphs the next one would count as used."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _engine(model, mcfg, dtype: str, eager: bool | None = None, num_kv_blocks: int | None = 4096,
            **kw) -> LLMEngine:
    """num_kv_blocks=None sizes the cache by profiling (half the GPU)."""
    cfg = EngineConfig(dtype=dtype, device=CUDA, max_model_len=1024, max_num_seqs=32, num_kv_blocks=num_kv_blocks,
                       max_num_batched_tokens=1024, gpu_memory_utilization=0.5, enforce_eager=eager, **kw)
    return LLMEngine.from_model(model, mcfg, cfg)


@pytest.fixture(scope="module")
def small_f32():
    cfg = shape_config("small")
    model, mcfg = random_model(cfg, torch.float32, CUDA, seed=11)
    return cfg, model, mcfg


@pytest.fixture(scope="module")
def small_bf16():
    cfg = shape_config("small")
    model, mcfg = random_model(cfg, torch.bfloat16, CUDA, seed=12)
    return cfg, model, mcfg


def _capture_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Every step's logits, as the sampler sees them."""
    seen: list[torch.Tensor] = []
    sample = engine.runner.sampler.sample
    engine.runner.sampler.sample = lambda logits, batch: (seen.append(logits.clone()), sample(logits, batch))[1]
    return seen


def test_profiled_cache_and_graphs_are_used(small_bf16):
    _, model, mcfg = small_bf16
    engine = _engine(model, mcfg, "bfloat16", num_kv_blocks=None)
    runner = engine.runner
    assert runner.memory_profile is not None and runner.memory_profile["num_blocks"] == runner.num_blocks
    assert runner.graphs is not None and set(runner.graphs.graphs) == set(runner.graphs.sizes)
    # Half the GPU for a 4-layer model: far more blocks than max_num_seqs full sequences need.
    assert runner.num_blocks > 32 * runner.max_blocks_per_seq
    replays: list[int] = []
    run = runner.graphs.run
    runner.graphs.run = lambda b: (replays.append(b), run(b))[1]
    outs = engine.generate(_prompts(5, mcfg.vocab_size, 0), GREEDY)
    assert all(len(o.new_token_ids) == 32 for o in outs)
    assert runner.graphs.bucket(5) in replays  # 5 decodes padded to their bucket (8, unless timing dropped it)
    assert set(runner.bucket_times["decode"]) >= set(runner.graphs.sizes)  # timed, maybe pruned
    runner.release()


def test_greedy_equals_transformers_with_cuda_graphs(small_f32):
    """float32 both sides: the same greedy tokens, several prompts batched, decodes replayed from graphs."""
    cfg, model, mcfg = small_f32
    engine = _engine(model, mcfg, "float32")
    assert engine.runner.graphs is not None
    prompts = _prompts(6, mcfg.vocab_size, 1)
    ours = [o.new_token_ids for o in engine.generate(prompts, GREEDY)]
    hf = hf_peer(model, cfg)
    for prompt, mine in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt], device=CUDA)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)
        assert mine == out[0, len(prompt):].tolist()


def test_teacher_forced_bf16_logits_match_transformers(small_bf16):
    """512 positions fed in four chunked-prefill steps through the runner (paged KV reads across steps)."""
    cfg, model, mcfg = small_bf16
    engine = _engine(model, mcfg, "bfloat16", eager=True)
    runner = engine.runner
    tokens = _prompts(1, mcfg.vocab_size, 2, 512, 513)[0]
    seq = Sequence("tf", tokens, GREEDY)
    assert engine.block_manager.allocate_slots(seq, len(tokens))
    chunks = []
    with torch.inference_mode():
        for start in range(0, 512, 128):
            seq.num_computed_tokens = start
            x = runner.prepare(SchedulerOutput([ScheduledSeq(seq, 128)], [], 128))
            with set_attention_metadata(x.meta):
                chunks.append(model.compute_logits(model(x.input_ids, x.positions)).float())
        ours = torch.cat(chunks)
        hf = hf_peer(model, cfg)
        ref = hf(torch.tensor([tokens], device=CUDA)).logits[0].float()
    err = (ours - ref).norm() / ref.norm()
    per_pos = (ours - ref).norm(dim=1) / ref.norm(dim=1)
    assert err < 2e-2, f"relative error {err:.4f} (worst position {per_pos.max():.4f})"
    assert per_pos.max() < 1e-1, f"worst position {per_pos.max():.4f} (overall {err:.4f})"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_equals_eager(small_f32, small_bf16, dtype):
    """The same requests with and without CUDA graphs: equal tokens in float32; in bfloat16 (where a
    different split-K choice may round differently) logits within bf16 noise."""
    cfg, model, mcfg = small_f32 if dtype == "float32" else small_bf16
    prompts = _prompts(13, mcfg.vocab_size, 3)  # 13 decodes: padded to the bucket of 16
    results = []
    for eager in (True, False):
        engine = _engine(model, mcfg, dtype, eager=eager)
        logits = _capture_logits(engine)
        outs = engine.generate(prompts, GREEDY)
        results.append(([o.new_token_ids for o in outs], logits))
        engine.runner.release()
    (tok_e, log_e), (tok_g, log_g) = results
    if dtype == "float32":
        assert tok_e == tok_g
    assert len(log_e) > 10
    # Step by step while both runs sampled the same tokens (bf16 rounding may flip a near tie later).
    for a, b in zip(log_e, log_g, strict=False):
        assert a.shape == b.shape
        assert (a - b).norm() / a.norm() < (1e-4 if dtype == "float32" else 2e-2)
        if not torch.equal(a.argmax(1), b.argmax(1)):
            break


def test_one_host_sync_per_decode_step(small_bf16):
    """Pinned inputs copied without waiting: a decode step's only sync is the sampled ids coming back."""
    _, model, mcfg = small_bf16
    engine = _engine(model, mcfg, "bfloat16")
    for i, p in enumerate(_prompts(8, mcfg.vocab_size, 4)):
        engine.add_request(f"s{i}", p, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for _ in range(3):  # prefills
        engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_graphs_equal_eager(small_f32, small_bf16, dtype):
    """Lone requests, so that each prefill chunk is a step alone and replays a prefill graph, against the same
    requests with those graphs off: equal tokens in float32, bf16 logits within bf16 noise. Prompts hit a
    bucket exactly, fall between buckets, exceed the step budget (chunked), and repeat a cached prefix."""
    _, model, mcfg = small_f32 if dtype == "float32" else small_bf16
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, mcfg.vocab_size, size=n).tolist() for n in (5, 16, 100, 300, 700)]
    prompts.append(prompts[3][:200] + [1, 2, 3])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = []
    for prefill_graphs in (False, True):
        cfg = EngineConfig(dtype=dtype, device=CUDA, max_model_len=1024, max_num_seqs=32, num_kv_blocks=4096,
                           max_num_batched_tokens=512, prefill_graphs=prefill_graphs)
        engine = LLMEngine.from_model(model, mcfg, cfg)
        logits = _capture_logits(engine)
        replayed: list[int] = []
        if prefill_graphs:
            graphs = engine.runner.prefill_graphs
            assert graphs is not None and set(graphs.graphs) == set(graphs.sizes) and graphs.sizes[-1] == 512
            graphs.run = lambda t, meta, run=graphs.run, seen=replayed: (seen.append(t), run(t, meta))[1]
        else:
            assert engine.runner.prefill_graphs is None
        tokens = [engine.generate([p], params)[0].new_token_ids for p in prompts]
        results.append((tokens, logits, replayed))
        engine.runner.release()
    (tok_e, log_e, _), (tok_g, log_g, replayed) = results
    # 5, 16, 100, 300 tokens; 700 = 512 + 188; the repeat: its 192 cached tokens (12 blocks) leave 11.
    assert replayed == [graphs.bucket(n) for n in (5, 16, 100, 300, 512, 188, 11)]  # timed, maybe pruned buckets
    if dtype == "float32":
        assert tok_e == tok_g
    assert len(log_e) == len(log_g) == 6 * 8  # one sampling step per token, requests one after another
    for r in range(6):  # each request's first logits come from its prefill; then while the tokens agree
        for a, b in zip(log_e[8 * r : 8 * r + 8], log_g[8 * r : 8 * r + 8], strict=True):
            assert (a - b).norm() / a.norm() < (1e-4 if dtype == "float32" else 2e-2)
            if not torch.equal(a.argmax(1), b.argmax(1)):
                break
