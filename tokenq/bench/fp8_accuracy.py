"""`tokenq bench fp8-accuracy`: what FP8 costs in accuracy on a real model (the default, on a CPU is fine).

Perplexity of a fixed public-domain text (tests/data) under float32, FP8 weights and activations, and FP8
weights, activations and KV cache; then greedy agreement: prompts cut from the same text, each continued
for --new-tokens greedy tokens by the float32 engine and by the FP8 ones, counting the tokens that match
the float32 continuation before the first difference.

Perplexity runs the text in windows of --window tokens, each fed in chunks of --chunk tokens through the
paged KV cache, so that every chunk after the first reads its context back from the cache (in FP8 where
the cache is FP8).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "tests" / "data" / "pride_and_prejudice_ch1-3.txt"


@dataclass(frozen=True)
class Mode:
    name: str
    quantization: str | None
    kv_cache_dtype: str


MODES = [Mode("float32", None, "auto"), Mode("fp8 weights+activations", "fp8", "auto"),
         Mode("fp8 weights+activations+kv", "fp8", "fp8")]


def add_parser(bsub) -> argparse.ArgumentParser:
    p = bsub.add_parser("fp8-accuracy", help="perplexity and greedy agreement of FP8 against float32 (CPU)")
    from tokenq import settings
    from tokenq.flag_checks import count, output_file, show_defaults

    p.add_argument("--model", default=settings.model_name(), help="a known model name or a HF directory")
    p.add_argument("--text", default=str(TEXT), help="the text to score (default: the shipped one)")
    p.add_argument("--window", type=count, default=512)
    p.add_argument("--chunk", type=count, default=128)
    p.add_argument("--num-prompts", type=count, default=20)
    p.add_argument("--prompt-len", type=count, default=32)
    p.add_argument("--new-tokens", type=count, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=output_file, default="bench-fp8-accuracy.json")
    show_defaults(p)
    return p


def perplexity(model, token_ids: list[int], kv_cache_dtype: str, window: int = 512, chunk: int = 128,
               block_size: int = 16) -> float:
    """exp(mean NLL) of every token after the first of each window, the model reading its context from a
    paged KV cache of kv_cache_dtype ("auto": the model's dtype, or "fp8")."""
    import torch

    from worker.layers.context import AttentionMetadata, set_attention_metadata

    cfg = model.cfg
    param = next(model.parameters())
    device = param.device
    dtype = model.lm_head.weight.dtype
    kv_dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else dtype
    blocks = -(-window // block_size)
    kv = torch.zeros(cfg.num_hidden_layers, 2, blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                     dtype=kv_dtype, device=device)
    model.bind_kv_cache(kv)
    table = torch.arange(blocks, dtype=torch.int32, device=device)[None]
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w0 in range(0, len(token_ids) - 1, window):
            ids = token_ids[w0 : w0 + window + 1]  # the window and the token after it, as the last target
            n = len(ids) - 1
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                meta = AttentionMetadata(
                    slot_mapping=torch.arange(a, b, device=device), query_start_loc=torch.tensor(
                        [0, b - a], dtype=torch.int32, device=device),
                    seq_lens=torch.tensor([b], dtype=torch.int32, device=device), block_tables=table,
                    max_query_len=b - a, max_seq_len=b, num_decodes=int(b - a == 1),
                    query_start_loc_cpu=[0, b - a], seq_lens_cpu=[b])
                with set_attention_metadata(meta):
                    hidden = model(torch.tensor(ids[a:b], device=device), torch.arange(a, b, device=device))
                logits = model.compute_logits(hidden).float()
                targets = torch.tensor(ids[a + 1 : b + 1], device=device)
                nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                count += b - a
    return math.exp(nll / count)


def prompts_from(token_ids: list[int], num: int, length: int) -> list[list[int]]:
    """num prompts of `length` tokens, cut at even spacing through the text."""
    step = max(1, (len(token_ids) - length) // num)
    return [token_ids[i * step : i * step + length] for i in range(num)]


def greedy_continuations(path, mode: Mode, prompts: list[list[int]], new_tokens: int, device: str) -> list[list[int]]:
    from protocol.sampling import SamplingParams
    from tokenq.engine_options import kernel_choices
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    cfg = EngineConfig(device=device, dtype="float32", quantization=mode.quantization,
                       kv_cache_dtype=mode.kv_cache_dtype, kv_cache_memory_gb=0.25, enable_prefix_caching=False,
                       max_model_len=max(map(len, prompts)) + new_tokens + 1, **kernel_choices())
    engine = LLMEngine(path, cfg)
    outs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    return [list(o.new_token_ids) for o in outs]


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Tokens that match the reference before the first difference, per prompt and in all."""
    prefix = []
    for ref, got in zip(reference, other, strict=True):
        k = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
        prefix.append(k)
    total = sum(len(r) for r in reference)
    return {"matching_prefix_tokens": prefix, "prefix_agreement": sum(prefix) / total,
            "identical_prompts": sum(k == len(r) for k, r in zip(prefix, reference, strict=True)),
            "num_prompts": len(reference)}


@contextmanager
def _stage(number: int, label: str) -> Iterator[None]:
    """A line as each of the run's six stages starts and ends: on a CPU the run takes minutes."""
    print(f"[{number}/{2 * len(MODES)}] {label} ...", end="", flush=True)
    t0 = time.perf_counter()
    yield
    print(f" {time.perf_counter() - t0:.0f} s", flush=True)


def main(args: argparse.Namespace) -> int:
    import torch
    from tokenizers import Tokenizer

    from tokenq.bench.report import machine_info, print_table, write_json
    from tokenq.engine_options import kernel_choices
    from tokenq.model_store import resolve_model
    from worker.engine.config import EngineConfig
    from worker.engine.kernel_choice import select_kernels
    from worker.models.loader import load_model

    select_kernels(EngineConfig(**kernel_choices()))  # the perplexity runs load models outside an engine
    name, path = resolve_model(args.model)
    ids = Tokenizer.from_file(str(Path(path) / "tokenizer.json")).encode(Path(args.text).read_text()).ids
    print(f"{name}: {len(ids)} tokens of {Path(args.text).name}, windows of {args.window} in chunks of "
          f"{args.chunk}; {args.num_prompts} prompts x {args.new_tokens} greedy tokens")
    ppl: dict[str, float] = {}
    models = {}
    for i, mode in enumerate(MODES, 1):
        with _stage(i, f"perplexity, {mode.name}"):
            if mode.quantization not in models:
                models[mode.quantization] = load_model(path, torch.float32, args.device,
                                                       quantization=mode.quantization)[0]
            ppl[mode.name] = perplexity(models[mode.quantization], ids, mode.kv_cache_dtype, args.window, args.chunk)
    del models
    prompts = prompts_from(ids, args.num_prompts, args.prompt_len)
    outs = {}
    for i, mode in enumerate(MODES, len(MODES) + 1):
        with _stage(i, f"greedy continuations, {mode.name}"):
            outs[mode.name] = greedy_continuations(path, mode, prompts, args.new_tokens, args.device)
    base = MODES[0].name
    agree = {mode.name: agreement(outs[base], outs[mode.name]) for mode in MODES[1:]}
    rows = [[base, ppl[base], "", "", ""]]
    for mode in MODES[1:]:
        a = agree[mode.name]
        rows.append([mode.name, ppl[mode.name], f"{ppl[mode.name] / ppl[base] - 1:+.2%}",
                     f"{a['prefix_agreement']:.1%}", f"{a['identical_prompts']}/{a['num_prompts']}"])
    print_table("FP8 accuracy", ["mode", "perplexity", "vs float32", "greedy tokens matching",
                                 "prompts identical"], rows)
    write_json(args.out, {
        "benchmark": "fp8-accuracy", "model": name, "machine": machine_info(),
        "text": Path(args.text).name, "text_tokens": len(ids), "window": args.window, "chunk": args.chunk,
        "perplexity": ppl, "perplexity_ratio": {m: ppl[m] / ppl[base] for m in ppl},
        "greedy": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "agreement": agree, "continuations": outs},
    })
    return 0
