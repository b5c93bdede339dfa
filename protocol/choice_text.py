"""The streamed text of a job with several choices: one string, appended to (one APPEND a delta), that
holds every choice's text as a log of records, one JSON line `[index, text]` each. JSON escapes line
breaks, so a record never holds one; a job of one choice keeps its plain text.

The worker writes records (`record`), the gateway and the expiry script read them back (`split`)."""

from __future__ import annotations

import json


def record(index: int, text: str) -> str:
    return json.dumps([index, text], ensure_ascii=False, separators=(",", ":")) + "\n"


def stored(index: int, text: str, choices: int) -> str:
    """What a delta appends: the text itself for one choice, a record for several."""
    return text if choices <= 1 else record(index, text)


def split(log: str, choices: int) -> list[str]:
    """Each choice's text from the stored string (a plain text when `choices` is 1)."""
    if choices <= 1:
        return [log]
    parts: list[list[str]] = [[] for _ in range(choices)]
    for line in log.split("\n"):  # not splitlines: JSON leaves U+2028 and U+0085 unescaped
        if line:
            index, text = json.loads(line)
            parts[index].append(text)
    return ["".join(p) for p in parts]
