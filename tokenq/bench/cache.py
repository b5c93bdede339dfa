"""`tokenq bench cache` (alias `semantic-cache`): the response caches with the production classes (the
same embedder, index, verifier, tenant scope and threshold as serving), in three parts:

1. precision and recall: every `text_a` of the chosen pairs (default: the held-out split, never used to
   train the verifier) in one tenant's cache, every `text_b` looked up. A hit is correct only when the
   pair is a duplicate and the hit is its own `text_a`. A table over thresholds, the raw cosine of the
   nearest entry beside it for comparison.
2. lookup latency with --entries cached (default 100,000): an exact hit, and a semantic lookup with its
   embedding, on one tenant's entries loaded from Redis as a gateway loads them.
3. a hit end to end: a `tokenq gateway` process, questions cached through it, then the same questions
   (exact hits) and their duplicates (semantic hits) timed by the client."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

THRESHOLDS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
COSINES = (0.85, 0.9, 0.93, 0.95, 0.97)
TENANT = "bench-cache"
SCOPE = "bench-scope"
# Bands of a pair's own cosine for the label check.
LABEL_BANDS = ((0.97, 1.01), (0.95, 0.97), (0.9, 0.95), (0.85, 0.9))
# Why a false hit is false: the query's own question, which Quora labels not a duplicate (`own`); another
# entry, for a query Quora labels a duplicate of its own question (`paraphrase`: often a third wording of
# the same question, which the metric counts false); another entry for a non-duplicate (`other`).
FALSE_KINDS = ("own", "paraphrase", "other")


def add_parser(bsub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from tokenq.flag_checks import count, existing_file, fraction, natural, output_file, show_defaults

    p = bsub.add_parser("cache", aliases=["semantic-cache"],
                        help="response caches: precision/recall on labelled pairs, lookup and end-to-end latency")
    p.add_argument("--pairs", default=str(Path("..") / "shared" / "data" / "qqp-dev.jsonl"), metavar="FILE.jsonl",
                   type=existing_file("pass --pairs FILE.jsonl: labelled question pairs, e.g. qqp-dev.jsonl"),
                   help="labelled question pairs (JSON lines)")
    p.add_argument("--split", choices=["held-out", "tune", "all"], default="held-out",
                   help="which pairs to measure on (all: a file kept apart, used whole)")
    p.add_argument("--threshold", type=fraction, default=None, help="default: the serving default")
    p.add_argument("--entries", type=natural, default=100_000,
                   help="cached entries for the latency part (0: skip)")
    p.add_argument("--queries", type=count, default=200, help="timed lookups of each kind")
    p.add_argument("--e2e", type=natural, default=100,
                   help="questions cached through the gateway (0: skip)")
    p.add_argument("--embeddings-cache", type=Path, default=None, help=".npz to keep embeddings in")
    p.add_argument("--redis-url", default=None, help="use this Redis (default: start one)")
    p.add_argument("--out", type=output_file, default="bench-cache.json")
    show_defaults(p)
    return p


def main(args: argparse.Namespace) -> int:
    from tokenq.embedded_redis import EmbeddedRedis

    workdir = args.workdir
    server = None if args.redis_url else EmbeddedRedis(workdir / "redis").start()
    url = args.redis_url or server.url
    try:
        report = asyncio.run(_run(args, url, workdir))
    finally:
        if server is not None:
            server.stop()
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


async def _run(args: argparse.Namespace, url: str, workdir: Path) -> dict:
    import redis.asyncio as aioredis

    from respcache.pairs import load_pairs, split
    from respcache.policy import DEFAULT_THRESHOLD
    from respcache.train import embed_all
    from tokenq.bench.report import cell

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    pairs = load_pairs(args.pairs)
    if args.split != "all":
        tune, held_out = split(pairs)
        pairs = held_out if args.split == "held-out" else tune
    redis = aioredis.from_url(url, decode_responses=True)
    await redis.flushdb()
    t = time.perf_counter()
    vec = embed_all([x for p in pairs for x in (p.text_a, p.text_b)], args.embeddings_cache)
    print(f"embedded {len(vec)} texts in {time.perf_counter() - t:.0f} s")
    report: dict = {"pairs": args.pairs, "split": args.split, "n_pairs": len(pairs),
                    "n_duplicates": sum(p.label for p in pairs), "threshold": threshold}
    parts = [_precision(redis, pairs, vec, threshold)]
    if args.entries:
        parts.append(_latency(redis, pairs, vec, args.entries, args.queries))
    if args.e2e:
        parts.append(_end_to_end(url, redis, pairs, args.e2e, workdir))
    for part in parts:
        found = await part
        report.update(found)
        # Each part's figures as it ends, kept on screen if a later part fails (the tables come at the end).
        print("  " + ", ".join(f"{k} {cell(v)}" for k, v in found.items() if isinstance(v, int | float | str)),
              flush=True)
    await redis.aclose()
    _print(report)
    return report


async def _fill(redis, tenant: str, rows: list[tuple[str, np.ndarray]], scope: str) -> None:
    """Semantic entries as the worker's fill writes them (the STORE script), pipelined."""
    from respcache import keys, store
    from respcache.index import encode_vector

    for i in range(0, len(rows), 1000):
        pipe = redis.pipeline(transaction=False)
        now = time.time()
        for n, (text, v) in enumerate(rows[i:i + 1000], start=i):
            result = json.dumps({"text": f"answer {n}", "finish_reason": "stop",
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
            entry_id = f"s:{n}"
            b64 = encode_vector(v)
            pipe.eval(store.STORE.lua, 4, keys.entry_key(tenant, entry_id), keys.index_key(tenant), keys.LOG_STREAM,
                      keys.pending_key("-"), entry_id,
                      store.entry_json(result, "chat", "bench", text, scope, b64), 86400, repr(now + 86400),
                      repr(now), 10 ** 7, tenant, keys.entry_key(tenant, ""), keys.LOG_MAXLEN, scope, b64, text)
        await pipe.execute()


async def _precision(redis, pairs, vec, threshold: float) -> dict:
    from respcache.semantic import SemanticCache
    from respcache.verifier import same_words

    entries = sorted({p.text_a for p in pairs})
    await _fill(redis, TENANT, [(t, vec[t]) for t in entries], SCOPE)
    sem = SemanticCache(redis)
    await sem.loaded()
    found = []
    for p in pairs:
        _, match = await sem.best(TENANT, SCOPE, p.text_b, vec[p.text_b])
        found.append((match.probability, match.text) if match else (0.0, ""))
    await sem.aclose()
    duplicates = max(1, sum(p.label for p in pairs))

    def row(scores: list[float], texts: list[str], at: float) -> dict:
        hits = [i for i, s in enumerate(scores) if s >= at]
        kinds = [hit_kind(pairs[i], texts[i]) for i in hits]
        correct = kinds.count("correct")
        # False hits on another pair's entry that is word for word the query: counted false, as the metric
        # says, though the answer is the one to the same question. Reported so the table's ceiling shows.
        same_text = sum(1 for i in hits if texts[i] == pairs[i].text_b and texts[i] != pairs[i].text_a)
        # Hits on an entry of the query's words, case and sentence marks aside (the verifier's rule).
        same = [k for k, i in enumerate(hits) if texts[i] != pairs[i].text_b and same_words(texts[i], pairs[i].text_b)]
        return {"threshold": at, "precision": correct / len(hits) if hits else None, "recall": correct / duplicates,
                "hit_rate": len(hits) / len(pairs), "hits": len(hits), "correct": correct,
                "false_hits_same_text": same_text, "hits_same_words": len(same),
                "false_hits_same_words": sum(kinds[k] != "correct" for k in same),
                **{f"false_hits_{k}": kinds.count(k) for k in FALSE_KINDS}}

    probs, texts = [f[0] for f in found], [f[1] for f in found]
    matrix = np.stack([vec[t] for t in entries])
    cos_scores, cos_texts = [], []
    for p in pairs:
        sims = matrix @ vec[p.text_b]
        j = int(np.argmax(sims))
        cos_scores.append(float(sims[j]))
        cos_texts.append(entries[j])
    at_default = row(probs, texts, threshold)
    return {**{k: at_default[k] for k in ("precision", "recall", "hit_rate")},
            "verifier_table": [row(probs, texts, x) for x in THRESHOLDS],
            "cosine_table": [row(cos_scores, cos_texts, x) for x in COSINES],
            "label_check": label_check(pairs, [float(vec[p.text_a] @ vec[p.text_b]) for p in pairs]),
            "label_check_same_words": same_words_check(pairs)}


def label_check(pairs: list, own_cosines: list[float]) -> list[dict]:
    """How often the labels call a pair a duplicate, by how alike its two questions are: the precision a
    cache would score on a band if it answered every pair in it."""
    bands = []
    for low, high in LABEL_BANDS:
        inside = [p for p, c in zip(pairs, own_cosines, strict=True)
                  if low <= c < high and p.text_a != p.text_b]
        bands.append({"cosine_from": low, "cosine_to": high, "pairs": len(inside),
                      "duplicate_share": sum(p.label for p in inside) / len(inside) if inside else None})
    return bands


def same_words_check(pairs: list) -> dict:
    """How often the labels call a pair a duplicate when its two questions are the same words, case and
    sentence marks aside (the verifier's rule; identical texts left out)."""
    from respcache.verifier import same_words

    same = [p for p in pairs if p.text_a != p.text_b and same_words(p.text_a, p.text_b)]
    return {"pairs": len(same), "duplicate_share": sum(p.label for p in same) / len(same) if same else None}


def hit_kind(pair, text: str) -> str:
    """`correct`, or which of FALSE_KINDS a hit on the entry `text` is, for the query `pair.text_b`."""
    if text == pair.text_a:
        return "correct" if pair.label == 1 else "own"
    return "paraphrase" if pair.label == 1 else "other"


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def _latency(redis, pairs, vec, entries: int, queries: int) -> dict:
    from prometheus_client import CollectorRegistry, Counter

    from gateway.response_cache import ResponseCache
    from protocol.jobs import JobPayload
    from protocol.sampling import SamplingParams
    from respcache import policy, scope, store
    from respcache.semantic import SemanticCache

    tenant = TENANT + "-latency"
    base = sorted({p.text_a for p in pairs})
    rng = np.random.default_rng(0)
    rows = [(t, vec[t]) for t in base]
    while len(rows) < entries:  # more entries near the real ones: their neighbourhoods get crowded
        t, v = rows[rng.integers(len(base))]
        w = v + rng.normal(0, 0.05, v.shape).astype(np.float32)
        rows.append((f"{t} #{len(rows)}", w / np.linalg.norm(w)))
    t0 = time.perf_counter()
    await _fill(redis, tenant, rows[:entries], SCOPE)
    fill_s = time.perf_counter() - t0
    sem = SemanticCache(redis)
    t0 = time.perf_counter()
    await sem.loaded()
    load_s = time.perf_counter() - t0
    questions = [p.text_b for p in pairs[:queries]]
    semantic_ms = []
    for q in questions:
        t0 = time.perf_counter()
        await sem.best(tenant, SCOPE, q)  # embeds the question, searches, verifies
        semantic_ms.append((time.perf_counter() - t0) * 1000)
    await sem.aclose()

    counters = CollectorRegistry()
    cache = ResponseCache(redis, Counter("lookups", "", ["kind"], registry=counters),
                          Counter("hits", "", ["kind"], registry=counters))
    decision = policy.Decision("exact", 1.0, 86400, 10 ** 7)
    payloads = [JobPayload(id=f"job_{i}", model="bench", kind="completion", tenant=tenant,
                           prompt_token_ids=list(range(i, i + 40)), sampling=SamplingParams(temperature=0))
                for i in range(queries)]
    result = json.dumps({"text": "cached", "finish_reason": "stop",
                         "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41}})
    for p in payloads:
        await store.store(redis, tenant, scope.exact_id(p, "digest"), store.entry_json(result, "completion", "bench"),
                          86400, 10 ** 7)
    exact_ms = []
    for p in payloads:
        t0 = time.perf_counter()
        found = await cache.lookup(decision, p, "digest", None)
        exact_ms.append((time.perf_counter() - t0) * 1000)
        assert found is not None and found.hit is not None
    return {"entries": entries, "fill_s": round(fill_s, 1), "index_load_s": round(load_s, 1),
            "lookup_ms_p50": _pct(semantic_ms, 50), "lookup_ms_p99": _pct(semantic_ms, 99),
            "exact_hit_ms_p50": _pct(exact_ms, 50), "exact_hit_ms_p99": _pct(exact_ms, 99)}


async def _end_to_end(url: str, redis, pairs, n: int, workdir: Path) -> dict:
    import httpx

    from jobstore import JobStore
    from jobstore.store import FinalWrite, JobRef
    from protocol import keys
    from protocol.jobs import JobResult, Usage
    from respcache import store
    from tokenq.bench.queue import BENCH_MODEL, _register_fake_worker
    from tokenq.embedded_redis import free_port, wait_for_port

    await _register_fake_worker(url)
    # Threshold 0: every paraphrase answers from its nearest entry. This part times hits, whatever their
    # precision (part 1 measures that); a miss would wait for a worker that never comes.
    await redis.hset(keys.tenant_key("default"), mapping={"cache_mode": "semantic", "cache_threshold": "0"})
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "tokenq", "gateway", "--redis-url", url, "--port", str(port)],
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                               stderr=open(workdir / "gateway.log", "wb"))
    try:
        wait_for_port(port, 60)
        firsts: dict[str, object] = {}
        for p in pairs:  # one pair per question: a question asked twice while seeding would hit the cache
            if p.label == 1:
                firsts.setdefault(p.text_a, p)
        dups = list(firsts.values())[:n]

        def body(text: str) -> dict:
            return {"model": BENCH_MODEL, "temperature": 0, "max_tokens": 16,
                    "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}]}

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for p in dups:  # misses: queued, then finished as a worker finishes them
                # Threshold 1 while seeding: a question must not be answered from the one seeded before it
                # (at the tenant's 0 it would be, and fill nothing).
                r = await client.post("/v1/jobs", json={**body(p.text_a), "cache": {"threshold": 1.0}})
                if r.headers.get("x-tokenq-cache"):
                    raise RuntimeError(f"seeding {p.text_a!r} hit the cache ({r.headers['x-tokenq-cache']})")
                job_id = r.json()["id"]
                result = JobResult(text=f"answer to {p.text_a}", finish_reason="stop",
                                   usage=Usage(prompt_tokens=1, completion_tokens=4, total_tokens=5)).model_dump_json()
                record = await redis.hgetall(keys.job_key(job_id))
                await JobStore(redis).write([], [FinalWrite(JobRef.of_record(job_id, record), "succeeded", result)])
                await store.fill(redis, job_id, result)
            # Until the gateway has loaded its index (every entry in Redis, the latency part's too; its
            # gauge says when): a job's submission answers at once, hit or miss, where a completion would
            # wait for a worker.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                r = await client.post("/v1/jobs", json=body(dups[0].text_b))
                if r.headers.get("x-tokenq-cache") == "semantic" and not await _index_loading(client):
                    break
                await asyncio.sleep(0.5)

            async def timed(text: str) -> tuple[float, str | None]:
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body(text))
                return (time.perf_counter() - t0) * 1000, r.headers.get("x-tokenq-cache")

            exact = [await timed(p.text_a) for p in dups]
            semantic = [await timed(p.text_b) for p in dups]
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    exact_hits = [ms for ms, kind in exact if kind == "exact"]
    semantic_hits = [ms for ms, kind in semantic if kind == "semantic"]
    return {"e2e_questions": len(exact), "e2e_exact_hits": len(exact_hits),
            "e2e_exact_hit_ms_p50": _pct(exact_hits, 50), "e2e_semantic_hits": len(semantic_hits),
            "e2e_semantic_hit_ms_p50": _pct(semantic_hits, 50)}


async def _index_loading(client) -> bool:
    """Whether the gateway's semantic index is still loading, from its /metrics page."""
    from tokenq.bench.report import metric_totals

    name = "tokenq_gateway_semantic_index_loading"
    return bool(metric_totals((await client.get("/metrics")).text, [name])[name])


def _fmt(precision: float | None) -> str:
    """Precision with no hits is undefined, not perfect."""
    return "n/a" if precision is None else f"{precision:.3f}"


def _print(r: dict) -> None:
    print(f"\n{r['n_pairs']} pairs ({r['split']}), {r['n_duplicates']} duplicates; default threshold {r['threshold']}")
    head = (f"{'precision':>10} {'recall':>8} {'hit rate':>9} {'hits':>6} {'same words':>11} {'same text':>10} "
            + " ".join(f"{'false ' + k:>16}" for k in FALSE_KINDS))
    for name, table, note in (("verifier p", "verifier_table", ""),
                              ("raw cosine", "cosine_table", "   (nearest entry, no verifier)")):
        print(f"{name:>11} {head}{note}")
        for row in r[table]:
            print(f"{row['threshold']:>11.2f} {_fmt(row['precision']):>10} {row['recall']:>8.3f} "
                  f"{row['hit_rate']:>9.3f} {row['hits']:>6} "
                  f"{str(row['hits_same_words']) + '/' + str(row['false_hits_same_words']):>11} "
                  f"{row['false_hits_same_text']:>10} "
                  + " ".join(f"{row['false_hits_' + k]:>16}" for k in FALSE_KINDS))
    print("(same words: hits/false hits on an entry of the query's words, case and sentence marks aside; "
          "same text: false hits whose entry is another pair's question, word for word the query; false own: "
          "the query's own question, labelled not a duplicate; false paraphrase: another entry, for a query "
          "labelled a duplicate of its own; false other: another entry, for a non-duplicate)")
    print("labels by the cosine of a pair's own two questions (identical texts left out):")
    for band in r["label_check"]:
        print(f"  cosine {band['cosine_from']:.2f}-{min(band['cosine_to'], 1.0):.2f}: {band['pairs']:>5} pairs, "
              f"{_fmt(band['duplicate_share'])} labelled duplicate")
    same = r["label_check_same_words"]
    print(f"  the same words, case and sentence marks aside: {same['pairs']:>5} pairs, {_fmt(same['duplicate_share'])} "
          "labelled duplicate")
    print(f"\nat the default threshold: precision {_fmt(r['precision'])}, recall {r['recall']:.3f}, "
          f"hit rate {r['hit_rate']:.3f}")
    if "entries" in r:
        print(f"{r['entries']} entries (index loaded in {r['index_load_s']} s): semantic lookup incl. embedding "
              f"p50 {r['lookup_ms_p50']:.1f} ms, p99 {r['lookup_ms_p99']:.1f} ms; exact hit p50 "
              f"{r['exact_hit_ms_p50']:.2f} ms, p99 {r['exact_hit_ms_p99']:.2f} ms")
    if "e2e_questions" in r:
        print(f"through the gateway: exact hits {r['e2e_exact_hits']}/{r['e2e_questions']} p50 "
              f"{r['e2e_exact_hit_ms_p50']:.1f} ms; semantic hits {r['e2e_semantic_hits']}/{r['e2e_questions']} "
              f"p50 {r['e2e_semantic_hit_ms_p50']:.1f} ms")
