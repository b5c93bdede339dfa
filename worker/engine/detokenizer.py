"""Incremental detokenization with stop strings: emit only text that is final.

Text is final when it is a whole UTF-8 character (a token may end mid-character: its text ends in
U+FFFD until the next token completes it) and when it cannot still be the start of a stop string.
Each update decodes only a short window of recent tokens, as vLLM does: the new text is
decode(ids[prefix:]) minus decode(ids[prefix:read]), where the tokens before `read` have been read.
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens decoded as left context for the first output tokens: tokenizers drop or change a
# leading space when a token starts the decoded text (SentencePiece, some byte-level BPE).
CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        # vLLM's min_tokens holds for stop strings too: none ends the output before that many tokens.
        self._min_tokens = min_tokens
        self._outputs = 0
        self._skip = skip_special_tokens
        self._stop = list(stop)
        self._include_stop = include_stop  # vLLM's include_stop_str_in_output: the match stays in the text
        context = list(prompt_token_ids[-CONTEXT_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT):
            # The prompt ends mid-character: its output begins with stray continuation bytes, which
            # decode(output) shows as U+FFFD; context would glue them onto the prompt instead.
            context = []
        self._ids = context
        self._prefix = 0  # start of the decode window
        self._read = len(context)  # tokens before this are read: their text is in the window prefix
        self._prefix_text = self._decode(context)
        self._taken = 0  # chars of the window's new text already taken past the prefix text
        self._pending = ""  # final text held back because it could start a stop string
        self._emitted: list[str] = []
        self.stopped = False
        self.matched_stop: str | None = None

    @property
    def output_text(self) -> str:
        return "".join(self._emitted)

    def update(self, new_token_ids: list[int]) -> tuple[str, bool]:
        """Add tokens; return (text safe to emit now, stopped)."""
        if self.stopped or not new_token_ids:
            return "", self.stopped
        self._ids.extend(new_token_ids)
        self._outputs += len(new_token_ids)
        return self._release(self._read_new_text(final=False)), self.stopped

    def flush(self) -> str:
        """At finish without a stop: release what was held, a trailing partial character included."""
        if self.stopped:
            return ""
        text = self._release(self._read_new_text(final=True))
        if not self.stopped:
            text += self._pending
            self._emit(self._pending)
            self._pending = ""
        return text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _read_new_text(self, final: bool) -> str:
        """Final text added since the last call, from a decode of the window only."""
        window = self._decode(self._ids[self._prefix :])
        complete = not window.endswith(REPLACEMENT)
        # Characters before a trailing partial one never change as bytes are appended.
        end = len(window) if complete or final else len(window.rstrip(REPLACEMENT))
        start = len(self._prefix_text) + self._taken
        new = window[start:end] if end > start else ""
        self._taken += len(new)
        # Slide the window once its text is whole and has grown (as vLLM does): tokens that decode to
        # nothing yet (skipped special tokens, a lone SentencePiece "▁") stay inside the window.
        if complete and len(window) > len(self._prefix_text):
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            self._taken = 0
        return new

    def _release(self, new: str) -> str:
        """Append final text; emit what cannot be (part of) a stop string, stop at the first one."""
        text = self._pending + new
        # Emitted text holds no start of a stop string, so a match lies wholly in `text`. The first
        # stop string to be completed wins (earliest end, then earliest start): that is what
        # token-by-token decoding would see, whatever the chunking.
        best: tuple[int, int, str] | None = None
        for s in self._stop if self._outputs >= self._min_tokens else ():
            i = text.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            end, start, s = best
            self.stopped, self.matched_stop = True, s
            self._pending = ""
            return self._emit(text[: end if self._include_stop else start])
        hold = self._stop_prefix_len(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return self._emit(text[: len(text) - hold])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text
