"""A model directory's card: what the gateway needs to tokenize and template prompts for it."""

from __future__ import annotations

import json
from pathlib import Path

from protocol.workers import ModelCard


def model_card(model_path: str | Path, name: str, max_model_len: int) -> ModelCard:
    model_path = Path(model_path)
    tok_cfg_path = model_path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    template_file = model_path / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else tok_cfg.get("chat_template")

    def token_text(v: object) -> str | None:
        return v.get("content") if isinstance(v, dict) else v  # type: ignore[return-value]

    return ModelCard(
        name=name,
        max_model_len=max_model_len,
        tokenizer_json=(model_path / "tokenizer.json").read_text(),
        chat_template=template,
        bos_token=token_text(tok_cfg.get("bos_token")),
        eos_token=token_text(tok_cfg.get("eos_token")),
        add_bos_token=bool(tok_cfg.get("add_bos_token", False)),
    )
