"""Our Llama-family model against Hugging Face's on tiny random checkpoints: prefill of several sequences in
one flattened step, decodes, chunked prefill and prefix reuse over a scattered paged KV cache."""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from worker.layers.context import AttentionMetadata, set_attention_metadata  # noqa: E402
from worker.models.loader import load_model  # noqa: E402

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def _llama(**kw):
    return transformers.LlamaConfig(**{**SMALL, **kw})


CONFIGS = {
    "llama-untied": lambda: _llama(tie_word_embeddings=False, rope_theta=10000.0),
    "llama-tied": lambda: _llama(tie_word_embeddings=True, num_hidden_layers=3, rope_theta=50000.0),
    "llama3-rope": lambda: _llama(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rope_theta=500000.0,
    ),
    "qwen2-bias": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "mistral-gqa4": lambda: transformers.MistralConfig(**{**SMALL, "num_key_value_heads": 1}, head_dim=32),
}


def _hf_model(name: str, tmp_path):
    cfg = CONFIGS[name]()
    cfg._attn_implementation = "eager"
    torch.manual_seed(hash(name) % 1000)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norm weights and biases, so that a mixed-up parameter shows
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    return hf


class PagedRunner:
    """A minimal stand-in for the model runner: per-sequence block lists over shuffled block ids."""

    def __init__(self, model, cfg, num_blocks: int = 48, block_size: int = 4):
        self.model, self.bs = model, block_size
        kv = torch.zeros(
            cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim
        )
        model.bind_kv_cache(kv)
        self.free = list(range(1, num_blocks))
        random.shuffle(self.free)
        self.blocks: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}

    def share_prefix(self, src: str, dst: str, n_blocks: int) -> None:
        self.blocks[dst] = list(self.blocks[src][:n_blocks])
        self.cached[dst] = n_blocks * self.bs

    def step(self, items: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """items: (seq id, new tokens), decodes first. Returns logits of every new token, per item."""
        ids, pos, slots, qsl, lens = [], [], [], [0], []
        num_decodes = 0
        for sid, toks in items:
            start = self.cached.get(sid, 0)
            blocks = self.blocks.setdefault(sid, [])
            end = start + len(toks)
            while len(blocks) * self.bs < end:
                blocks.append(self.free.pop())
            for p in range(start, end):
                slots.append(blocks[p // self.bs] * self.bs + p % self.bs)
            ids += toks
            pos += range(start, end)
            qsl.append(qsl[-1] + len(toks))
            lens.append(end)
            self.cached[sid] = end
            num_decodes += len(toks) == 1 and num_decodes == len(lens) - 1
        width = max(len(self.blocks[s]) for s, _ in items)
        bt = torch.zeros(len(items), width, dtype=torch.int32)
        for i, (sid, _) in enumerate(items):
            bt[i, : len(self.blocks[sid])] = torch.tensor(self.blocks[sid])
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=bt,
            max_query_len=max(len(t) for _, t in items),
            max_seq_len=max(lens),
            num_decodes=num_decodes,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=lens,
        )
        with torch.inference_mode(), set_attention_metadata(meta):
            hidden = self.model(torch.tensor(ids), torch.tensor(pos))
            logits = self.model.compute_logits(hidden)
        return [logits[qsl[i] : qsl[i + 1]] for i in range(len(items))]


def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def _check(ours: torch.Tensor, hf, tokens: list[int]) -> None:
    ref = _hf_logits(hf, tokens)[-ours.shape[0] :]
    assert ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_matches_hf(name, tmp_path):
    hf = _hf_model(name, tmp_path)
    model, cfg = load_model(tmp_path, torch.float32, "cpu")
    assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    runner = PagedRunner(model, cfg)
    g = torch.Generator().manual_seed(1)
    seqs = {s: torch.randint(0, 512, (n,), generator=g).tolist() for s, n in (("a", 13), ("b", 5), ("c", 21))}
    out = runner.step([(s, t) for s, t in seqs.items()])  # three prefills in one flattened step
    for (_, toks), logits in zip(seqs.items(), out, strict=True):
        _check(logits, hf, toks)
    for _ in range(4):  # decodes of all three at once, greedy
        items = []
        for s, toks in seqs.items():
            nxt = int(_hf_logits(hf, toks)[-1].argmax())
            toks.append(nxt)
            items.append((s, [nxt]))
        out = runner.step(items)
        for (_, toks), logits in zip(seqs.items(), out, strict=True):
            assert logits.shape[0] == 1
            _check(logits, hf, toks)


@pytest.mark.parametrize("name", ["llama-untied", "qwen2-bias"])
def test_chunked_prefill_and_mixed_step(name, tmp_path):
    hf = _hf_model(name, tmp_path)
    model, cfg = load_model(tmp_path, torch.float32, "cpu")
    runner = PagedRunner(model, cfg)
    g = torch.Generator().manual_seed(2)
    long = torch.randint(0, 512, (30,), generator=g).tolist()
    other = torch.randint(0, 512, (7,), generator=g).tolist()
    _check(runner.step([("o", other)])[0], hf, other)
    # Step 2: a decode of "o" plus the first chunk (11 tokens, not block-aligned) of "long".
    other.append(3)
    d, c1 = runner.step([("o", [3]), ("long", long[:11])])
    _check(d, hf, other)
    _check(c1, hf, long[:11])
    # Step 3: the rest of "long" attends over its cached first chunk.
    (c2,) = runner.step([("long", long[11:])])
    _check(c2, hf, long)


def test_prefix_reuse_computes_only_the_tail(tmp_path):
    hf = _hf_model("llama-tied", tmp_path)
    model, cfg = load_model(tmp_path, torch.float32, "cpu")
    runner = PagedRunner(model, cfg)
    g = torch.Generator().manual_seed(3)
    first = torch.randint(0, 512, (18,), generator=g).tolist()
    runner.step([("first", first)])
    shared_blocks = 3  # 12 tokens at block_size 4
    second = first[:12] + torch.randint(0, 512, (5,), generator=g).tolist()
    runner.share_prefix("first", "second", shared_blocks)
    (tail,) = runner.step([("second", second[12:])])
    assert tail.shape[0] == 5
    _check(tail, hf, second)


def test_unknown_architecture_is_rejected(tmp_path):
    from worker.models.config import ModelConfig

    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported model"):
        ModelConfig.from_dir(tmp_path)


def test_forward_without_cache_raises(tmp_path):
    _hf_model("llama-untied", tmp_path)
    model, _ = load_model(tmp_path, torch.float32, "cpu")
    meta = AttentionMetadata(
        torch.tensor([0]),
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([1], dtype=torch.int32),
        torch.zeros(1, 1, dtype=torch.int32),
        1,
        1,
        1,
        [0, 1],
        [1],
    )
    with set_attention_metadata(meta), pytest.raises(RuntimeError, match="bind_kv_cache"):
        model(torch.tensor([1]), torch.tensor([0]))


@pytest.mark.slow
def test_default_model_last_token_logits_match_hf(default_model_dir):
    model, cfg = load_model(default_model_dir, torch.float32, "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    ids = tok.encode("The capital of France is a city called").ids
    runner = PagedRunner(model, cfg, num_blocks=16, block_size=16)
    (ours,) = runner.step([("p", ids)])
    ref = _hf_logits(hf, ids)[-1]
    assert (ours[-1] - ref).abs().max().item() < 1e-3
    assert int(ours[-1].argmax()) == int(ref.argmax())


def test_config_accepts_old_rope_fields_and_merges_eos(tmp_path):
    import json

    from worker.models.config import ModelConfig

    c = {
        **SMALL,
        "model_type": "llama",
        "architectures": None,
        "rope_theta": 500000.0,
        "eos_token_id": [7, 8],
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(c))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [8, 9]}))
    m = ModelConfig.from_dir(tmp_path)
    assert m.rope_theta == 500000.0
    assert m.rope_scaling["rope_type"] == "llama3" and m.rope_scaling["factor"] == 8.0
    assert m.eos_token_ids == [7, 8, 9]
    assert m.architectures == ["LlamaForCausalLM"] and m.head_dim == 16


@pytest.mark.parametrize("extra, window", [
    ({"model_type": "mistral", "sliding_window": 16}, 16),
    ({"model_type": "mistral", "sliding_window": None}, None),
    ({"model_type": "qwen2", "sliding_window": 16, "use_sliding_window": False}, None),
    ({"model_type": "qwen2", "sliding_window": 16, "use_sliding_window": True, "max_window_layers": 2}, None),
    ({"model_type": "qwen2", "sliding_window": 16, "use_sliding_window": True, "max_window_layers": 1}, 16),
    ({"model_type": "qwen2", "sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]}, 16),
    ({"model_type": "qwen2", "sliding_window": 16, "layer_types": ["full_attention"] * 2}, None),
])
def test_sliding_window_is_read_as_transformers_reads_it(extra, window):
    """A window read as absent gives wrong tokens past it (our attention does not slide); one read where no
    layer slides would cap the context for nothing."""
    from worker.engine.config import EngineConfig
    from worker.engine.tp_ranks import resolve_max_model_len
    from worker.models.config import ModelConfig

    cfg = ModelConfig.from_dict({**SMALL, **extra})
    assert cfg.sliding_window == window
    assert resolve_max_model_len(EngineConfig(), cfg) == (window or SMALL["max_position_embeddings"])
    assert resolve_max_model_len(EngineConfig(max_model_len=8), cfg) == 8


def test_a_sliding_window_model_serves_one_window_with_transformers_tokens(tmp_path, default_model_dir):
    """Mistral with a window of 16: the engine took 256 tokens (its positions) and past the window its tokens
    left transformers' (a probe: 0 of 7 prompts alike). It takes one window now, where they agree."""
    import shutil

    from protocol.sampling import SamplingParams
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    cfg = transformers.MistralConfig(**SMALL, sliding_window=16)
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    hf.save_pretrained(tmp_path)
    shutil.copy(default_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    engine = LLMEngine(tmp_path, EngineConfig(num_kv_blocks=16, block_size=16, kernels="torch"))
    assert engine.max_model_len == 16
    prompts = [[1, 5, 9, 77, 300], [1, 2, 3, 4, 5, 6, 7, 8, 400]]
    outs = [engine.generate([p], SamplingParams(temperature=0.0, max_tokens=16 - len(p), ignore_eos=True))[0]
            for p in prompts]
    with torch.inference_mode():
        for p, out in zip(prompts, outs, strict=True):
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=16 - len(p), min_new_tokens=16 - len(p), do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
            assert out.new_token_ids == ref
