"""IncrementalDetokenizer: deltas add up to a full decode, no broken UTF-8, stop strings held and cut."""

from __future__ import annotations

import random

import pytest

from worker.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade, Ångström, Straße, Ελληνικά, русский текст.",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 and 🧑🏽‍💻 mixed with text 🚀!",
    "  leading spaces\n\ttabs\n\nnewlines   and trailing  ",
    "def f(x):\n    return x ** 2  # ∑ ∫ ≤ ≥ → ←\n",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


class ByteTokenizer:
    """A tokenizer whose tokens are given byte strings: token boundaries exactly where a test wants."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.calls: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(ids))
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def byte_tokens(*pieces: bytes | str) -> tuple[ByteTokenizer, list[int]]:
    raw = [p.encode() if isinstance(p, str) else p for p in pieces]
    return ByteTokenizer(raw), list(range(len(raw)))


def run(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None) -> list[str]:
    """Feed ids in chunks of the given sizes (one at a time by default); deltas, flush last."""
    deltas, i = [], 0
    sizes = iter(chunks or [])
    while i < len(ids):
        n = next(sizes, 1)
        delta, stopped = detok.update(ids[i : i + n])
        deltas.append(delta)
        i += n
        if stopped:
            break
    deltas.append(detok.flush())
    return deltas


def random_chunks(rng: random.Random, n: int) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(rng.randint(1, 6))
    return sizes


def encode(tok, text: str) -> list[int]:
    enc = tok.encode(text, add_special_tokens=False)
    return enc.ids if hasattr(enc, "ids") else list(enc)


# --- round trips against a full decode ---------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_matches_full_decode(tokenizer, text):
    prompt = encode(tokenizer, "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    ids = encode(tokenizer, text)
    for p in (prompt, []):
        detok = IncrementalDetokenizer(tokenizer, p, stop=[])
        deltas = run(detok, ids)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == full == text
        assert detok.output_text == full
        assert not any("\ufffd" in d for d in deltas)  # no broken character ever emitted


def test_random_chunks_match_full_decode(tokenizer, hf_tokenizer):
    rng = random.Random(0)
    for tok in (tokenizer, hf_tokenizer):
        for text in TEXTS:
            ids = encode(tok, text)
            for _ in range(5):
                detok = IncrementalDetokenizer(tok, encode(tok, "Prompt: é"), stop=[])
                deltas = run(detok, ids, random_chunks(rng, len(ids)))
                assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
                assert not any("\ufffd" in d for d in deltas)


def test_random_token_ids_match_full_decode(tokenizer):
    """Arbitrary ids: partial bytes, special tokens, stray continuation bytes, all in any order."""
    rng = random.Random(1)
    vocab = tokenizer.get_vocab_size()
    for trial in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        skip = trial % 2 == 0
        detok = IncrementalDetokenizer(tokenizer, prompt, stop=[], skip_special_tokens=skip)
        chunks = random_chunks(rng, len(ids)) if trial % 3 else None
        deltas = run(detok, ids, chunks)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip), (prompt, ids)


def sentencepiece_like():
    """A Llama-2 style decoder: "▁" is a space, byte fallback, and one leading space stripped."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁": 3, "!": 4, "Hello": 5, "<0xC3>": 6, "<0xA9>": 7}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def test_leading_space_tokenizer_continues_the_prompt():
    """The output is the text that follows the prompt's: a first "▁world" shows as " world", and a
    lone "▁" inside the output keeps its space even when it would start a decode window. Byte
    tokens come in valid pairs: ByteFallback turns a whole invalid run into U+FFFD per byte, which
    no window can foresee."""
    tok = sentencepiece_like()
    assert tok.decode([3, 3, 5]) == " Hello" and tok.decode([3, 5]) == "Hello"
    rng = random.Random(3)
    for trial in range(200):
        ids = [t for _ in range(rng.randint(1, 12)) for t in rng.choice([[1], [2], [3], [4], [5], [6, 7]])]
        prompt = [rng.choice([1, 2, 4, 5]) for _ in range(trial % 4)]
        detok = IncrementalDetokenizer(tok, prompt, stop=[])
        text = "".join(run(detok, ids, random_chunks(rng, len(ids)) if trial % 2 else None))
        expected = tok.decode(prompt + ids)[len(tok.decode(prompt)) :] if prompt else tok.decode(ids)
        assert text == expected, (prompt, ids)


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = encode(tokenizer, "Hi there<|im_end|>")
    assert "".join(run(IncrementalDetokenizer(tokenizer, [], []), ids)) == "Hi there"
    kept = "".join(run(IncrementalDetokenizer(tokenizer, [], [], skip_special_tokens=False), ids))
    assert kept == "Hi there<|im_end|>"


def test_multibyte_split_across_tokens_held_until_complete():
    tok, ids = byte_tokens("a", b"\xf0\x9f", b"\x98", b"\x80b", "c")  # 😀 over three tokens
    detok = IncrementalDetokenizer(tok, [], stop=[])
    assert detok.update([0]) == ("a", False)
    assert detok.update([1]) == ("", False)
    assert detok.update([2]) == ("", False)
    assert detok.update([3]) == ("😀b", False)
    assert detok.update([4]) == ("c", False)
    assert detok.flush() == ""
    assert detok.output_text == "a😀bc"


def test_sequence_ending_mid_character_flushes_replacement_like_decode():
    tok, ids = byte_tokens("ok ", b"\xe2\x82")  # first two bytes of "€"
    detok = IncrementalDetokenizer(tok, [], stop=[])
    assert detok.update(ids) == ("ok ", False)
    assert detok.flush() == tok.decode(ids)[3:] == "\ufffd"
    assert detok.output_text == tok.decode(ids)


def test_prompt_ending_mid_character_does_not_swallow_output():
    tok, _ = byte_tokens(b"x\xe2\x82", b"\xac", "y")
    detok = IncrementalDetokenizer(tok, [0], stop=[])
    assert "".join(run(detok, [1, 2])) == tok.decode([1, 2]) == "\ufffdy"


def test_cost_per_token_does_not_grow(tokenizer):
    text = " ".join(TEXTS) * 20
    ids = encode(tokenizer, text)
    assert len(ids) > 1000
    sizes: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(Counting(), encode(tokenizer, "a long prompt " * 50), stop=["NEVER"])
    assert "".join(run(detok, ids)) == text
    assert max(sizes) <= 12  # a window of a few tokens, never the whole output
    assert len(sizes) <= 2 * len(ids) + 4


# --- stop strings -------------------------------------------------------------------------------


def first_stop(text: str, stops: list[str]) -> str:
    """Reference: text up to the stop string that completes first (earliest end, then earliest start)."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    return text[: min(hits)[1]] if hits else text


def test_stop_string_spanning_tokens(tokenizer):
    text = "The answer is forty-two. THE END of the story."
    ids = encode(tokenizer, text)
    stop = "THE END"
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # it really spans tokens
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    deltas = run(detok, ids)
    assert "".join(deltas) == detok.output_text == "The answer is forty-two. "
    assert detok.stopped and detok.matched_stop == stop
    assert detok.update(encode(tokenizer, " more")) == ("", True)
    assert detok.flush() == ""


def test_stop_string_at_the_very_start():
    tok, ids = byte_tokens("ST", "OP", " and more")
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert detok.update([0]) == ("", False)  # "ST" could begin "STOP"
    assert detok.update([1]) == ("", True)
    assert detok.output_text == ""


def test_no_stop_string_ends_the_output_before_min_tokens():
    """As vLLM: a stop string found in the first min_tokens tokens is text; one that a later token
    completes (even if it began earlier) stops the output."""
    tok, _ = byte_tokens("a.", "b", ".", "c.")
    detok = IncrementalDetokenizer(tok, [], stop=["."], min_tokens=3)
    assert detok.update([0]) == ("a.", False)  # token 1 of 3: the stop is plain text
    assert detok.update([1]) == ("b", False)
    assert detok.update([2]) == ("", True)  # token 3: stops
    assert detok.output_text == "a.b" and detok.matched_stop == "."
    tok, _ = byte_tokens("x", "ST", "OP")
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"], min_tokens=3)
    assert detok.update([0, 1]) == ("x", False)  # "ST" is held: it may begin a stop
    assert detok.update([2]) == ("", True)  # completed by the third token: it counts


def test_later_starting_shorter_stop_completes_first():
    tok, ids = byte_tokens("x", "ab", "c", "d")
    detok = IncrementalDetokenizer(tok, [], stop=["abcd", "c"])
    assert detok.update([0]) == ("x", False)
    assert detok.update([1]) == ("", False)  # "ab" could begin "abcd"
    assert detok.update([2]) == ("ab", True)  # "c" completes before "abcd" could
    assert detok.matched_stop == "c"
    # The same in one chunk: the result does not depend on how tokens arrive.
    detok = IncrementalDetokenizer(tok, [], stop=["abcd", "c"])
    assert detok.update(ids) == ("xab", True)


def test_include_stop_keeps_the_matched_string_and_cuts_after_it():
    tok, ids = byte_tokens("x", "ab", "cd", "ef")
    detok = IncrementalDetokenizer(tok, [], stop=["bc"], include_stop=True)
    assert detok.update([0]) == ("x", False)
    assert detok.update([1]) == ("a", False)  # "b" could begin "bc"
    assert detok.update([2]) == ("bc", True)  # the stop string stays; the "d" after it does not
    assert detok.output_text == "xabc" and detok.matched_stop == "bc"
    detok = IncrementalDetokenizer(tok, [], stop=["bc"])
    assert "".join(run(detok, ids)) == "xa"  # the default cuts before it


def test_stops_ending_together_cut_at_the_earliest_start():
    tok, ids = byte_tokens("a", "bc")
    detok = IncrementalDetokenizer(tok, [], stop=["c", "bc"])
    assert run(detok, ids) == ["a", "", ""]
    assert detok.matched_stop == "bc"


def test_held_prefix_released_when_not_a_stop():
    tok, ids = byte_tokens("Hello ", "EN", "D", "ing", " EN")
    detok = IncrementalDetokenizer(tok, [], stop=["ENDS"])
    assert detok.update([0]) == ("Hello ", False)
    assert detok.update([1]) == ("", False)
    assert detok.update([2]) == ("", False)
    assert detok.update([3]) == ("ENDing", False)
    assert detok.update([4]) == (" ", False)
    assert detok.flush() == "EN"  # finished without a stop: the held text is released
    assert detok.output_text == "Hello ENDing EN"
    assert not detok.stopped


def test_stop_inside_a_chunk_that_ends_mid_character():
    tok, ids = byte_tokens("ab", "STOP", b"\xf0\x9f")
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert detok.update(ids) == ("ab", True)


def test_stop_strings_with_multibyte_text(tokenizer):
    text = "Voilà 😀 c'est fini — 終わり。 Encore du texte."
    ids = encode(tokenizer, text)
    for stop in (["終わり"], ["😀 c"], ["—", "fini"], ["Voil"]):
        for chunks in (None, [3] * len(ids), [len(ids)]):
            detok = IncrementalDetokenizer(tokenizer, [], stop=stop)
            deltas = run(detok, ids, chunks)
            assert "".join(deltas) == first_stop(text, stop), (stop, chunks)
            assert detok.stopped
            assert not any("\ufffd" in d for d in deltas)


def test_random_stops_match_reference_whatever_the_chunking(tokenizer):
    rng = random.Random(2)
    for text in TEXTS:
        ids = encode(tokenizer, text)
        for _ in range(10):
            stops = []
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(text))
                stops.append(text[i : i + rng.randint(1, 6)] or "x")
            if rng.random() < 0.3:
                stops.append("not in the text")
            for chunks in (None, random_chunks(rng, len(ids))):
                detok = IncrementalDetokenizer(tokenizer, [], stop=stops)
                deltas = run(detok, ids, chunks)
                assert "".join(deltas) == detok.output_text == first_stop(text, stops), (stops, chunks)
