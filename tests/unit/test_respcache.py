"""Response cache pieces without services: the tenant policy and the request's option, the keys, the
numpy embedder against sentence-transformers, the pairs split."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.jobs import ChatMessage, JobPayload
from protocol.sampling import SamplingParams
from respcache import policy, scope
from respcache.pairs import Pair, split


def payload(ids: list[int], **sampling) -> JobPayload:
    return JobPayload(id="job_1", model="m", kind="chat", prompt_token_ids=ids,
                      sampling=SamplingParams(**sampling))


def test_policy_reads_the_tenant_hash_and_keeps_defaults_for_bad_values():
    p = policy.TenantCachePolicy.from_fields(["semantic", "0.95", "60", "7"])
    assert (p.mode, p.threshold, p.ttl_s, p.max_entries) == ("semantic", 0.95, 60, 7)
    bad = policy.TenantCachePolicy.from_fields(["always", "2", "x", "-1"])
    assert bad == policy.TenantCachePolicy()


def test_a_request_may_only_tighten_the_threshold_and_sampling_must_be_determined():
    tenant = policy.TenantCachePolicy(mode="semantic", threshold=0.9)
    assert policy.decide(tenant, policy.CacheOption(threshold=0.5), True).threshold == 0.9
    assert policy.decide(tenant, policy.CacheOption(threshold=0.97), True).threshold == 0.97
    assert policy.decide(tenant, policy.CacheOption(mode="off"), True) is None
    assert policy.decide(tenant, None, deterministic=False) is None
    assert policy.decide(policy.TenantCachePolicy(), None, True) is None  # off unless someone opts in
    assert policy.decide(policy.TenantCachePolicy(), policy.CacheOption(mode="exact"), True).mode == "exact"
    with pytest.raises(ValueError):
        policy.CacheOption(threshold=1.5)


def test_exact_key_covers_prompt_sampling_and_card():
    base = scope.exact_id(payload([1, 2], temperature=0), "card")
    assert base == scope.exact_id(payload([1, 2], temperature=0), "card")
    assert base != scope.exact_id(payload([1, 3], temperature=0), "card")
    assert base != scope.exact_id(payload([1, 2], temperature=0, max_tokens=7), "card")
    assert base != scope.exact_id(payload([1, 2], temperature=0), "other card")
    assert scope.deterministic(payload([1], temperature=0))
    assert scope.deterministic(payload([1], temperature=0.8, seed=3))
    assert not scope.deterministic(payload([1], temperature=0.8))


def test_semantic_scope_is_everything_but_the_last_user_message():
    def key(messages, **sampling):
        return scope.semantic_key(payload([1], temperature=0, **sampling), "card",
                                  [ChatMessage(role=r, content=c) for r, c in messages], None, None)

    a = key([("system", "be brief"), ("user", "How do I learn Python?")])
    b = key([("system", "be brief"), ("user", "What is the best way to learn Python?")])
    assert a.scope == b.scope and a.text != b.text and a.entry_id != b.entry_id
    assert key([("system", "be verbose"), ("user", "How do I learn Python?")]).scope != a.scope
    assert key([("system", "be brief"), ("user", "How do I learn Python?")], top_k=5).scope != a.scope
    assert key([("user", "hi"), ("assistant", "Sure:")]) is None  # nothing to embed


def test_split_is_disjoint_by_question():
    pairs = [Pair("a", "b", 1), Pair("b", "c", 0), Pair("d", "e", 1), Pair("f", "g", 0)] + [
        Pair(f"q{i}", f"r{i}", i % 2) for i in range(200)]
    tune, held = split(pairs)
    assert tune and held and len(tune) + len(held) == len(pairs)
    assert not {t for p in tune for t in (p.text_a, p.text_b)} & {t for p in held for t in (p.text_a, p.text_b)}


def test_numpy_embedder_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from respcache.embedder import Embedder, model_dir

    texts = ["How do I get my focus back?", "Is 3 a prime number, and why is 1 not one?"]
    ours = Embedder.load().embed(texts)
    theirs = st.SentenceTransformer(str(model_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_vector_index_is_per_tenant_and_scope_and_drops_removed_and_expired():
    pytest.importorskip("usearch")
    from respcache.index import VectorIndex, decode_vector, encode_vector

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex()
    index.add("a", "s:1", "scope", vectors[0], "one", expires_at=200.0)
    index.add("a", "s:2", "scope", vectors[1], "two", expires_at=50.0)
    index.add("b", "s:3", "scope", vectors[2], "three", expires_at=200.0)
    assert [c.entry_id for c in index.nearest("a", "scope", vectors[0], 4, now=100.0)] == ["s:1"]  # s:2 expired
    assert [c.entry_id for c in index.nearest("b", "scope", vectors[0], 4, now=100.0)] == ["s:3"]
    assert index.nearest("a", "other scope", vectors[0], 4, now=100.0) == []
    index.remove("a", "s:1")
    assert index.nearest("a", "scope", vectors[0], 4, now=0.0)[0].entry_id == "s:2"
    assert len(index) == 2
    assert np.allclose(decode_vector(encode_vector(vectors[0])), vectors[0], atol=1e-3)
