"""CUDA graphs for decode-only steps: one graph per bucketed batch size, replayed over static buffers.

A decode step runs a few small kernels per layer, and at small batches launching them costs more than
running them; a graph launches the whole forward at once. What a graph bakes in must not change between
replays, so a batch is padded up to its bucket, and the attention metadata's host values (which kernels
use to size their grids) are fixed per bucket: every row claims a context of max_model_len tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from worker.layers.context import AttentionMetadata, set_attention_metadata

MAX_GRAPH_BATCH = 512


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (at most 512), which is always a bucket itself."""
    top = max(1, min(max_num_seqs, MAX_GRAPH_BATCH))
    sizes = [b for b in (1, 2, 4, 8) if b <= top] + list(range(16, top + 1, 8))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


@dataclass
class StaticInputs:
    """The runner's device buffers that a captured graph reads; rows [:bucket] hold one padded batch."""

    input_ids: torch.Tensor  # [>= max bucket] int64
    positions: torch.Tensor  # [>= max bucket] int64
    slot_mapping: torch.Tensor  # [>= max bucket] int64
    seq_lens: torch.Tensor  # [>= max bucket] int32
    query_start_loc: torch.Tensor  # [>= max bucket + 1] int32, always 0, 1, 2, ... for decodes
    block_tables: torch.Tensor  # [>= max bucket, max blocks per sequence] int32


class DecodeGraphs:
    """Captured forwards of decode batches, one per bucket; `capture=False` runs the same padded
    batches eagerly (CPU, or a check that padding changes nothing)."""

    def __init__(self, model: torch.nn.Module, inputs: StaticInputs, sizes: list[int], max_model_len: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.inputs = inputs
        self.sizes = sizes
        self.max_model_len = max_model_len
        self.hidden = torch.zeros(sizes[-1], hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest bucket that holds num_seqs rows, or None when the batch is too big for any."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def _meta(self, b: int) -> AttentionMetadata:
        x = self.inputs
        return AttentionMetadata(
            slot_mapping=x.slot_mapping[:b],
            query_start_loc=x.query_start_loc[: b + 1],
            seq_lens=x.seq_lens[:b],
            block_tables=x.block_tables[:b],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            num_decodes=b,
            query_start_loc_cpu=list(range(b + 1)),
            seq_lens_cpu=[self.max_model_len] * b,
        )

    def _forward(self, b: int) -> None:
        with set_attention_metadata(self._meta(b)):
            self.hidden[:b] = self.model(self.inputs.input_ids[:b], self.inputs.positions[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool. The buffers
        must hold a harmless padded batch (the runner fills them) for the warm-up and capture passes."""
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):
            self._forward(b)  # warm-up: compiles and autotunes kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def run(self, b: int) -> torch.Tensor:
        """Hidden states [b, hidden] of the padded batch now in rows [:b] of the buffers."""
        graph = self.graphs.get(b)
        if graph is None:
            self._forward(b)
        else:
            graph.replay()
        return self.hidden[:b]
