"""Guided decoding: a grammar matcher per constrained sequence, a token bitmask filled on the host for the
constrained rows of a step, applied to their logits on the device before sampling.

xgrammar, not llguidance: on the CPU with SmolLM2's 49k vocabulary it fills a token mask about ten times
faster (a few µs a token against tens), which is what grows with the batch; both compile a nested JSON
schema in milliseconds, and compiled grammars are cached here by `GuidedSpec.cache_key()`.

JSON is compiled without free whitespace (one space after `:` and `,`, none elsewhere): a model that
wanders cannot loop on whitespace, and the stop tokens are allowed only where the grammar may end.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import xgrammar as xgr
from tokenizers import Tokenizer

from protocol.guided import GuidedSpec

MAX_CACHED_GRAMMARS = 256
THREADED_FILL_ROWS = 128
JSON_SEPARATORS = (", ", ": ")
_SOURCE_PLACE = re.compile(r"\[\d\d:\d\d:\d\d\] \S+\.cc:\d+: ")  # xgrammar's "[10:25:23] /project/cpp/x.cc:94: "


class GrammarError(ValueError):
    """A constraint that does not compile (bad schema, regex or grammar): its request fails alone, the
    client's fault (gateway/schema_rules.py refuses most such constraints before they are queued)."""

    error_type = "invalid_request_error"


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> xgr.TokenizerInfo:
    """The vocabulary as xgrammar reads it. `vocab_size` is the model's (its logits' width), which may pass
    the tokenizer's own: ids without a token are never allowed. Without stop ids (a random-weight model)
    xgrammar finds the vocabulary's own end-of-text tokens."""
    encoded = [tokenizer.id_to_token(i) or "" for i in range(tokenizer.get_vocab_size())]
    # How tokens spell bytes (byte-level, byte-fallback, raw) is read from tokenizer.json, as xgrammar's
    # own from_huggingface does.
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
    return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=sorted(stop_ids) or None,
                             add_prefix_space=meta["add_prefix_space"])


class GrammarCache:
    """Compiled grammars by the constraint's canonical JSON, least recently used dropped past `capacity`."""

    def __init__(self, info: xgr.TokenizerInfo, capacity: int = MAX_CACHED_GRAMMARS) -> None:
        self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self._grammars: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self.capacity = capacity
        self.compiled = 0  # how many compilations ran (a hit runs none)

    def __len__(self) -> int:
        return len(self._grammars)

    def get(self, spec: GuidedSpec) -> xgr.CompiledGrammar:
        key = spec.cache_key()
        grammar = self._grammars.get(key)
        if grammar is not None:
            self._grammars.move_to_end(key)
            return grammar
        try:
            grammar = self._compile(spec)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses with the reason
            reason = _SOURCE_PLACE.sub("", str(e)).strip()
            raise GrammarError(f"the output constraint ({_field(spec)}) does not compile: {reason}") from e
        if not _admits_output(grammar):  # checked once per grammar, never again for a cached one
            raise GrammarError(f"the output constraint ({_field(spec)}) admits no output: no text could satisfy it")
        self.compiled += 1
        self._grammars[key] = grammar
        if len(self._grammars) > self.capacity:
            self._grammars.popitem(last=False)
        return grammar

    def _compile(self, spec: GuidedSpec) -> xgr.CompiledGrammar:
        c = self._compiler
        if spec.json_schema is not None or spec.json_object:
            schema = spec.json_schema if spec.json_schema is not None else {"type": "object"}
            grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False,
                                                   separators=JSON_SEPARATORS, strict_mode=spec.json_schema is not None)
            return c.compile_grammar(_no_control_characters(str(grammar)))
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.choice is not None:
            return c.compile_grammar("root ::= " + " | ".join(_ebnf_literal(s) for s in spec.choice))
        assert spec.grammar is not None
        return c.compile_grammar(spec.grammar)


# xgrammar writes the characters of a length-bounded string (maxLength) as any but quote, backslash and
# newline, so a control character could pass, which JSON forbids; its unbounded strings exclude them.
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _no_control_characters(ebnf: str) -> str:
    return ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)


def _admits_output(grammar: xgr.CompiledGrammar) -> bool:
    """Whether any first token is allowed: a grammar that allows none could only fail its request's first
    token, so its request is refused as it starts instead."""
    first = xgr.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)
    xgr.GrammarMatcher(grammar).fill_next_token_bitmask(first)
    return bool(first.any())


def _field(spec: GuidedSpec) -> str:
    return next(k for k in ("json_schema", "regex", "choice", "grammar") if getattr(spec, k) is not None) \
        if not spec.json_object else "json_object"


def _ebnf_literal(s: str) -> str:
    """A string literal of xgrammar's EBNF: JSON's escapes, non-ASCII kept as is."""
    return json.dumps(s, ensure_ascii=False)


class GuidedState:
    """One sequence's matcher and how many of its output tokens it has accepted."""

    __slots__ = ("matcher", "accepted", "error")

    def __init__(self, grammar: xgr.CompiledGrammar) -> None:
        self.matcher = xgr.GrammarMatcher(grammar)
        self.accepted = 0
        self.error: str | None = None

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def advance(self, output_token_ids: list[int], pending: Callable[[], int]) -> None:
        """Accepts the output tokens not accepted yet; a stand-in (-1) is the token `pending()` returns."""
        while self.error is None and self.accepted < len(output_token_ids) and not self.terminated:
            token = output_token_ids[self.accepted]
            if token < 0:
                token = pending()
            if not self.matcher.accept_token(token):
                self.error = f"guided decoding: token {token} breaks the output constraint"
            self.accepted += 1

    @property
    def wants_mask(self) -> bool:
        return self.error is None and not self.terminated


class GuidedDecoding:
    """Grammars and masks for the engine. The vocabulary is read on the first constrained request, so an
    engine that never sees one pays nothing."""

    def __init__(self, info: Callable[[], xgr.TokenizerInfo], vocab_size: int) -> None:
        self._make_info = info
        self.vocab_size = vocab_size
        self._cache: GrammarCache | None = None
        # Threads pay off on large batches only: below that one thread fills faster than it hands out work.
        self._one_thread = xgr.BatchGrammarMatcher(max_threads=1)
        self._threads = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
        self._host_mask: torch.Tensor | None = None
        self._host_rows = torch.empty(0, dtype=torch.int64)
        self._copied: torch.cuda.Event | None = None  # the last copy out of the host buffer

    @property
    def cache(self) -> GrammarCache:
        if self._cache is None:
            self._cache = GrammarCache(self._make_info())
        return self._cache

    def start(self, spec: GuidedSpec) -> GuidedState:
        """A matcher for a new request; GrammarError when the constraint does not compile, or admits no
        output at all (a schema that only refers to itself)."""
        return GuidedState(self.cache.get(spec))

    def mask(self, states: list[GuidedState], rows: list[int], device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens each matcher allows next, [len(states), ceil(vocab / 32)] int32, and the logits rows
        they are for, both on `device`. Filled by xgrammar's threads (the GIL released) while the step's
        forward runs on the GPU, and copied from pinned memory without waiting for it."""
        n = len(states)
        if self._copied is not None:
            self._copied.synchronize()  # the device has read the last step's mask out of the buffers
        host, host_rows = self._host_buffers(n, device)
        filler = self._threads if n >= THREADED_FILL_ROWS else self._one_thread
        filler.batch_fill_next_token_bitmask([s.matcher for s in states], host[:n])
        host_rows[:n] = torch.as_tensor(rows, dtype=torch.int64)
        if device.type != "cuda":
            return host[:n], host_rows[:n]
        mask, idx = host[:n].to(device, non_blocking=True), host_rows[:n].to(device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return mask, idx

    def _host_buffers(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinned buffers for the mask and its rows, grown to the largest constrained batch seen."""
        if self._host_mask is None or self._host_mask.shape[0] < n:
            size = max(n, 2 * (self._host_mask.shape[0] if self._host_mask is not None else 8))
            pin = device.type == "cuda"
            self._host_mask = torch.empty(xgr.get_bitmask_shape(size, self.vocab_size), dtype=xgr.bitmask_dtype,
                                          pin_memory=pin)
            self._host_rows = torch.empty(size, dtype=torch.int64, pin_memory=pin)
        return self._host_mask, self._host_rows


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits[rows[j]] keep only the tokens bit-set in bitmask[j]; other rows are untouched.
    `rows` is on the logits' device (no copy that would wait for the forward)."""
    if len(rows) == logits.shape[0]:  # every row constrained: rows are 0..n-1 (the engine's order)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1])
        return
    sub = logits.index_select(0, rows)
    xgr.apply_token_bitmask_inplace(sub, bitmask, vocab_size=logits.shape[1])
    logits.index_copy_(0, rows, sub)
