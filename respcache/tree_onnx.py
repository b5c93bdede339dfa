"""A LightGBM binary classifier as an ONNX graph (a tree ensemble, then a sigmoid), so that the gateway runs
the verifier on onnxruntime, which the embedder already needs, and never imports LightGBM. The graph takes
the booster's own dump (`Booster.dump_model()`), so it answers as the booster does: the same trees, leaf
values and split rule."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from respcache.verifier import THRESHOLD_KEY


def split_value(threshold: float) -> float:
    """The largest float32 at or below a split's threshold: LightGBM compares a float32 feature with a double
    threshold (x <= t), and ONNX's split values are float32, so a threshold rounded up could send a feature
    equal to the rounded value the other way."""
    t32 = np.float32(threshold)
    return float(np.nextafter(t32, np.float32(-np.inf)) if float(t32) > threshold else t32)


def booster_to_onnx(dump: dict, threshold: float) -> onnx.ModelProto:
    """The dump of a binary LightGBM booster as a graph from x [n, features] float32 to p [n, 1], the
    probability of the positive class; `threshold` rides along as metadata."""
    if dump.get("objective") != "binary sigmoid:1" or dump.get("average_output"):
        raise ValueError(f"a binary booster (sigmoid 1) that sums its trees is needed, got {dump.get('objective')!r}")
    nodes: dict[str, list] = {k: [] for k in (
        "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
        "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true")}
    leaves: dict[str, list] = {k: [] for k in ("target_ids", "target_nodeids", "target_treeids", "target_weights")}

    def add(tree: int, node: dict, ids: list[int]) -> int:
        nid = ids[0]
        ids[0] += 1
        row = len(nodes["nodes_nodeids"])
        leaf = "leaf_value" in node
        if not leaf and (node["decision_type"] != "<=" or node["missing_type"] != "None"):
            raise ValueError(f"only '<=' splits without missing values are exported, got {node['decision_type']!r}, "
                             f"missing {node['missing_type']!r}")
        for key, value in (("nodes_treeids", tree), ("nodes_nodeids", nid),
                           ("nodes_featureids", 0 if leaf else node["split_feature"]),
                           ("nodes_values", 0.0 if leaf else split_value(node["threshold"])),
                           ("nodes_modes", "LEAF" if leaf else "BRANCH_LEQ"), ("nodes_truenodeids", 0),
                           ("nodes_falsenodeids", 0), ("nodes_missing_value_tracks_true", 0)):
            nodes[key].append(value)
        if leaf:
            for key, value in (("target_ids", 0), ("target_nodeids", nid), ("target_treeids", tree),
                               ("target_weights", node["leaf_value"])):
                leaves[key].append(value)
        else:
            nodes["nodes_truenodeids"][row] = add(tree, node["left_child"], ids)
            nodes["nodes_falsenodeids"][row] = add(tree, node["right_child"], ids)
        return nid

    for tree, info in enumerate(dump["tree_info"]):
        add(tree, info["tree_structure"], [0])
    n_features = dump["max_feature_idx"] + 1
    graph = helper.make_graph(
        [helper.make_node("TreeEnsembleRegressor", ["x"], ["score"], domain="ai.onnx.ml", n_targets=1,
                          aggregate_function="SUM", post_transform="NONE", **nodes, **leaves),
         helper.make_node("Sigmoid", ["score"], ["p"])],
        "verifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    helper.set_model_props(model, {THRESHOLD_KEY: repr(float(threshold))})
    onnx.checker.check_model(model)
    return model
