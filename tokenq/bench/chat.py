"""`tokenq bench chat`: concurrent chat requests through the whole served path (HTTP gateway, Redis, worker,
engine process) against transformers' `generate` of the same prompts as one batch: the CPU target of
issue 11 (32 requests of `--output-len` tokens, greedy, every request generating all of them).

The chat messages are user messages of `--words` words each, so the prompts (the model's chat template
around them) are of about one length and the peer's batch needs little padding.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time


def add_parser(bsub) -> argparse.ArgumentParser:
    from tokenq import settings
    from tokenq.engine_options import add_engine_flags
    from tokenq.flag_checks import count, natural, output_file, show_defaults

    p = bsub.add_parser("chat", help="concurrent chat requests via the gateway vs HF generate (one batch)")
    p.add_argument("--model", default=settings.model_name(), help="a known model name or a HF directory")
    p.add_argument("--redis-url", default=None, help="default: an embedded Redis of its own")
    p.add_argument("--num-requests", type=count, default=32)
    p.add_argument("--output-len", type=count, default=128)
    p.add_argument("--words", type=count, default=24, help="words in each user message")
    p.add_argument("--gateway-workers", type=count, default=1)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--out", type=output_file, default="bench-chat.json")
    add_engine_flags(p)
    show_defaults(p)
    return p


def messages(n: int, words: int, seed: int) -> list[str]:
    from tokenq.bench.engine import WORDS

    rng = random.Random(seed)
    return [f"Write a {' '.join(rng.choice(WORDS) for _ in range(words))}." for _ in range(n)]


async def _served(base: str, model: str, texts: list[str], output_len: int) -> dict:
    import httpx

    def body(text: str) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": output_len,
                "temperature": 0, "ignore_eos": True}

    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=len(texts) + 1)) as client:
        (await client.post(f"{base}/v1/chat/completions", json={**body(texts[0]), "max_tokens": 4})).raise_for_status()
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(client.post(f"{base}/v1/chat/completions", json=body(t)) for t in texts))
        elapsed = time.perf_counter() - t0
    for r in replies:
        r.raise_for_status()
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in replies)
    return {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def main(args: argparse.Namespace) -> int:
    from gateway.prompts import PromptBuilder
    from protocol.jobs import ChatMessage
    from tokenq.bench.engine import run_peer
    from tokenq.bench.report import machine_info, print_table, write_json
    from tokenq.bench.serve import start_stack, stop_stack
    from tokenq.model_store import resolve_model
    from worker.models.card import model_card

    name, path = resolve_model(args.model)
    texts = messages(args.num_requests, args.words, args.seed)
    builder = PromptBuilder(model_card(path, name, 1 << 20))
    prompts = [builder.encode_chat([ChatMessage(role="user", content=t)]) for t in texts]
    lengths = sorted(len(p) for p in prompts)
    print(f"{len(texts)} chat requests (prompts of {lengths[0]}-{lengths[-1]} tokens), {args.output_len} new "
          f"tokens each, model {name} on {args.device}")
    args.redis_url = args.redis_url or None
    workdir = args.workdir
    base, procs, redis = start_stack(args, path, workdir)
    try:
        served = asyncio.run(_served(base, name, texts, args.output_len))
    finally:
        stop_stack(procs, redis)
    rows = [["tokenq served (gateway)", served["output_tokens"], served["seconds"], served["output_tokens_per_s"]]]
    result = {"benchmark": "chat", "model": name, "machine": machine_info(),
              "workload": {"num_requests": len(texts), "prompt_len": [lengths[0], lengths[-1]],
                           "output_len": args.output_len, "seed": args.seed}, "served": served}
    if not args.skip_peer:
        peer, _ = run_peer(path, prompts, args.output_len)
        rows.append(["HF generate (one batch)", peer["output_tokens"], peer["seconds"], peer["output_tokens_per_s"]])
        result.update(peer=peer, ratio=served["output_tokens_per_s"] / peer["output_tokens_per_s"])
    print_table("output tokens/s", ["system", "output tokens", "seconds", "tokens/s"], rows)
    if "ratio" in result:
        print(f"\nratio served / peer: {result['ratio']:.2f}x")
    write_json(args.out, result)
    return 0
