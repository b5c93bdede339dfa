"""CUDA graphs, replayed over static buffers: decode-only steps (one graph per bucketed batch size) and
steps that are one prefill chunk alone (one graph per bucketed token count).

A decode step runs a few small kernels per layer, and at small batches launching them costs more than
running them; a graph launches the whole forward at once. The same holds for a lone request's prefill:
eagerly, Llama-3-8B's ~350 launches took the host about three times the GPU's time for a prompt of a few
hundred tokens, and that is time to first token at low load. What a graph bakes in must not change between
replays, so a step is padded up to its bucket, and the attention metadata's host values (which kernels use
to size their grids) are fixed per bucket: every sequence claims a context of max_model_len tokens.

Buckets are then timed and the slow ones dropped: a forward's speed is not monotonic in its row count (on
an H200, Llama-3-8B's forward at 448 rows replayed a third slower than at 456 or 512 rows, likely a matmul
shape its library handles badly), so a step that fits such a bucket pads up to the next larger one that
replays faster.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenq_kernels.attention_metadata import AttentionMetadata
from worker.layers.context import set_attention_metadata

MAX_GRAPH_BATCH = 512
# Past this many tokens a prefill's GPU time dwarfs its launches, and a graph's activations would hold
# memory the KV cache could use.
MAX_PREFILL_GRAPH_TOKENS = 1024
# A bucket is dropped when a larger one replays faster by more than this share (timing noise is ~1%).
BUCKET_TIME_TOLERANCE = 0.03


def fastest_buckets(times: dict[int, float], tolerance: float = BUCKET_TIME_TOLERANCE) -> list[int]:
    """The buckets worth keeping, given each one's replay time: those no slower than every larger bucket
    (within `tolerance`). The largest is always kept, so every size that had a bucket still has one."""
    kept: list[int] = []
    best = float("inf")
    for size in sorted(times, reverse=True):
        if times[size] <= best * (1 + tolerance):
            kept.append(size)
        best = min(best, times[size])
    return sorted(kept)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (at most 512), which is always a bucket itself."""
    top = max(1, min(max_num_seqs, MAX_GRAPH_BATCH))
    sizes = [b for b in (1, 2, 4, 8) if b <= top] + list(range(16, top + 1, 8))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def prefill_token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, then every 64 up to max_tokens (at most MAX_PREFILL_GRAPH_TOKENS): padding costs a
    prompt at most 64 tokens of GPU time, never a launch. Empty below 16 tokens."""
    top = min(max_tokens, MAX_PREFILL_GRAPH_TOKENS)
    if top < 16:
        return []
    sizes = [t for t in (16, 32) if t <= top] + list(range(64, top + 1, 64))
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


class _BucketedGraphs:
    """Captured forwards over the static buffers, one per bucket size; where a bucket has no graph (on a
    CPU, where nothing is captured) its padded step runs eagerly, which is how the padding is tested."""

    def __init__(self, model: torch.nn.Module, inputs: StaticInputs, sizes: list[int], max_model_len: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.inputs = inputs
        self.sizes = sizes
        self.max_model_len = max_model_len
        self.hidden = torch.zeros(sizes[-1], hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.times: dict[int, float] = {}  # replay time (ms) of every captured bucket, once timed

    def bucket(self, n: int) -> int | None:
        """The smallest bucket that holds n rows, or None when the step is too big for any."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def _meta(self, size: int) -> AttentionMetadata:
        """What a captured launch sees: fixed per bucket (only the grid comes from these)."""
        raise NotImplementedError

    def _forward(self, size: int, meta: AttentionMetadata | None = None) -> None:
        with set_attention_metadata(meta or self._meta(size)):
            self.hidden[:size] = self.model(self.inputs.input_ids[:size], self.inputs.positions[:size])

    def capture(self) -> None:
        """The buffers must hold a harmless padded step (the runner fills them)."""
        self.graphs = _capture(self.sizes, self._forward)

    def keep_fastest(self, repeats: int = 3,
                     combine: Callable[[list[float]], list[float]] | None = None) -> dict[int, float]:
        """Times every captured graph (ms, median of `repeats` replays, CUDA events, one sync for all) and
        drops the buckets a larger one beats (see `fastest_buckets`); returns the times. The buffers must
        hold a harmless padded step, as for `capture`. `combine` makes the times agree over ranks."""
        events: dict[int, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        for size, graph in self.graphs.items():
            graph.replay()  # warm: the first replay after capture also uploads the graph
            pairs = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                pairs.append((start, end))
            events[size] = pairs
        torch.cuda.synchronize()
        self.times = {size: statistics.median(a.elapsed_time(b) for a, b in pairs) for size, pairs in events.items()}
        if combine is not None:
            self.times = dict(zip(self.times, combine(list(self.times.values())), strict=True))
        self.sizes = fastest_buckets(self.times)
        self.graphs = {size: self.graphs[size] for size in self.sizes}
        return self.times

    def run(self, size: int, meta: AttentionMetadata | None = None) -> torch.Tensor:
        """Hidden states [size, hidden] of the padded step now in rows [:size] of the buffers; `meta` is
        the step's own, for an eager run (the bucket's fixed one when None)."""
        graph = self.graphs.get(size)
        if graph is None:
            self._forward(size, meta)
        else:
            graph.replay()
        return self.hidden[:size]


class DecodeGraphs(_BucketedGraphs):
    """Decode batches, one graph per batch-size bucket: every padded row claims a context of max_model_len
    tokens."""

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

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


class PrefillGraphs(_BucketedGraphs):
    """A step that is one prefill chunk and nothing else, one graph per token bucket.

    The chunk's T tokens are rows [:T] of the buffers and rows [T:bucket] are padding: token 0 at position 0,
    written to the scratch block (harmless), outside the sequence's query range (query_start_loc is 0, T), so
    attention skips them and their hidden rows are never sampled. Run eagerly (CPU), the padded step uses
    its own metadata."""

    def _meta(self, t: int) -> AttentionMetadata:
        """The bucket's tokens as one query of a max_model_len context (the kernels read the real bounds
        from the device buffers)."""
        x = self.inputs
        return AttentionMetadata(
            slot_mapping=x.slot_mapping[:t],
            query_start_loc=x.query_start_loc[:2],
            seq_lens=x.seq_lens[:1],
            block_tables=x.block_tables[:1],
            max_query_len=t,
            max_seq_len=self.max_model_len,
            num_decodes=0,
            query_start_loc_cpu=[0, t],
            seq_lens_cpu=[self.max_model_len],
        )


@torch.inference_mode()
def _capture(sizes: list[int], forward) -> dict[int, torch.cuda.CUDAGraph]:
    """One graph per size, largest first so the smaller ones reuse its memory pool."""
    pool = torch.cuda.graph_pool_handle()
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    for size in reversed(sizes):
        forward(size)  # warm-up: compiles and autotunes kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            forward(size)
        graphs[size] = graph
    torch.cuda.synchronize()
    return graphs
