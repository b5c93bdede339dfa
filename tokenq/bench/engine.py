"""`tokenq bench engine`: our engine offline vs Hugging Face `generate` batched, same prompts and lengths.

Prompts are random in-vocabulary token ids of uniform random length, or with `--chat` user messages in the
model's chat template, all of one length (so the peer's batch needs no padding, as a served chat load of
equal prompts); both sides generate exactly `--output-len` tokens greedily (ours with ignore_eos, the peer
with min_new_tokens), so both produce the same number of tokens and the ratio of output tokens/s is the
ratio of wall times.
"""

from __future__ import annotations

import argparse
import gc
import random
import time


def make_prompts(vocab_size: int, special_ids: set[int], n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    allowed = [i for i in range(vocab_size) if i not in special_ids]
    return [[rng.choice(allowed) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


WORDS = ("story about the sea and a small boat that sails at night under many stars while the old captain "
         "tells his young crew how the winds of the north once carried him home").split()


def make_chat_prompts(path, n: int, words: int, seed: int) -> list[list[int]]:
    """n chat prompts (the model's template around a user message of `words` words, shuffled per prompt),
    trimmed to the shortest so that all have one length."""
    from gateway.prompts import PromptBuilder
    from protocol.jobs import ChatMessage
    from worker.models.card import model_card

    builder = PromptBuilder(model_card(path, "bench", 1 << 20))
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        prompts.append(builder.encode_chat([ChatMessage(role="user", content=f"Write a {text}.")]))
    shortest = min(len(p) for p in prompts)
    # Cut from the middle of the user message, keeping the template's head and the assistant's header.
    return [p[: shortest - 8] + p[len(p) - 8:] for p in prompts]


def run_ours(path, cfg, prompts: list[list[int]], output_len: int) -> tuple[dict, list[list[int]]]:
    from protocol.sampling import SamplingParams
    from worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(path, cfg)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.generate([prompts[0][:32]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.new_token_ids) for o in outs)
    del engine
    gc.collect()
    return {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}, [
        o.new_token_ids for o in outs]


def run_peer(path, prompts: list[list[int]], output_len: int) -> tuple[dict, list[list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = dict(do_sample=False, pad_token_id=pad, max_new_tokens=output_len, min_new_tokens=output_len)
    with torch.inference_mode():
        model.generate(ids[:1, -32:], attention_mask=mask[:1, -32:], **{**kwargs, "max_new_tokens": 4,
                                                                        "min_new_tokens": 4})
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        elapsed = time.perf_counter() - t0
    new = out[:, width:]
    tokens = int(new.numel())
    return {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}, new.tolist()


def bench_engine(args: argparse.Namespace) -> int:
    import torch
    from tokenizers import Tokenizer

    from tokenq.bench.report import machine_info, print_table, write_json
    from tokenq.engine_options import engine_config_from
    from tokenq.model_store import resolve_model
    from worker.models.config import ModelConfig

    name, path = resolve_model(args.model)
    mcfg = ModelConfig.from_dir(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    special = set(tok.get_added_tokens_decoder())
    if args.chat:
        prompts = make_chat_prompts(path, args.num_prompts, args.chat_words, args.seed)
        lengths = [len(prompts[0])] * 2
    else:
        prompts = make_prompts(mcfg.vocab_size, special, args.num_prompts, args.min_prompt_len,
                               args.max_prompt_len, args.seed)
        lengths = [args.min_prompt_len, args.max_prompt_len]
    cfg = engine_config_from(args)
    print(f"{len(prompts)} {'chat ' if args.chat else ''}prompts of {lengths[0]}-{lengths[1]} tokens, "
          f"{args.output_len} new tokens each, model {name}, torch threads {torch.get_num_threads()}")
    ours, our_tokens = run_ours(path, cfg, prompts, args.output_len)
    rows = [["tokenq engine", ours["output_tokens"], ours["seconds"], ours["output_tokens_per_s"]]]
    result = {"benchmark": "engine", "model": name, "machine": machine_info(),
              "workload": {"num_prompts": args.num_prompts, "prompt_len": lengths, "chat": args.chat,
                           "output_len": args.output_len, "seed": args.seed},
              "engine_config": vars(cfg), "ours": ours}
    if not args.skip_peer:
        peer, peer_tokens = run_peer(path, prompts, args.output_len)
        rows.append(["HF generate (batched)", peer["output_tokens"], peer["seconds"],
                     peer["output_tokens_per_s"]])
        ratio = ours["output_tokens_per_s"] / peer["output_tokens_per_s"]
        same = sum(a == b for a, b in zip(our_tokens, peer_tokens, strict=True))
        result.update(peer=peer, ratio=ratio, identical_greedy_outputs=same)
    print_table("output tokens/s", ["system", "output tokens", "seconds", "tokens/s"], rows)
    if "ratio" in result:
        print(f"\nratio tokenq / peer: {result['ratio']:.2f}x   "
              f"(greedy outputs identical for {result['identical_greedy_outputs']}/{len(prompts)} prompts)")
    write_json(args.out, result)
    return 0
