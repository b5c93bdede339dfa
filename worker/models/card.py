"""A model directory's card: what the gateway needs to tokenize and template prompts for it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from protocol.workers import ModelCard

# Of each weight file, this many bytes from its middle join the fingerprint: a fine-tune of the same shapes
# differs there, where the safetensors header (names, shapes, offsets) would not.
SAMPLE_BYTES = 1 << 20
_DECIDING_FILES = ("config.json", "generation_config.json")


def engine_fingerprint(model_path: str | Path, numerics: dict[str, object]) -> str:
    """A sha256 of what decides an answer besides the tokenizer and the template: the model's config, each
    weight file's name, size and a sample of its bytes, and the engine's numeric settings (dtype,
    quantization, KV cache dtype). Read in milliseconds however large the weights."""
    model_path = Path(model_path)
    h = hashlib.sha256(json.dumps(numerics, sort_keys=True).encode())
    for path in sorted(model_path.iterdir()):
        if path.name in _DECIDING_FILES:
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".pt"):
            size = path.stat().st_size
            with path.open("rb") as f:
                f.seek(max(size // 2 - SAMPLE_BYTES // 2, 0))
                h.update(f"{path.name}\0{size}\0".encode() + f.read(SAMPLE_BYTES))
    return h.hexdigest()


def model_card(model_path: str | Path, name: str, max_model_len: int, engine: str = "") -> ModelCard:
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
        engine=engine,
    )
