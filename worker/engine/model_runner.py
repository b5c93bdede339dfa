"""Turns a scheduled step into model inputs, runs the model (a captured graph for decode-only steps and for
a prefill chunk alone), and samples on the device.

A step is flattened: the new tokens of every scheduled sequence are concatenated (decodes first), with
positions, cache slots, block tables and query offsets beside them. They are computed with numpy from
per-sequence values into persistent pinned host buffers and copied to the device without waiting. Nothing in a step waits for the GPU: `launch` returns the samples
still on the device, and a decode row whose last token is not known yet on the host (see
`Sequence.pending`) takes its input id from the previous step's samples there, so the engine can launch
step N+1 before it reads step N's tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from protocol.sampling import SamplingParams
from tokenq.logs import get_logger
from tokenq_kernels.dispatch import use_triton
from worker.engine.config import ConfigError, EngineConfig
from worker.engine.cuda_graphs import (
    DecodeGraphs,
    PrefillGraphs,
    StaticInputs,
    graph_batch_sizes,
    prefill_token_buckets,
)
from worker.engine.distributed import agree, head_shard, tp_rank, tp_size
from worker.engine.prompt_logprobs import (
    PromptSlice,
    fill_prompt_logprobs,
    plan_prompt_logprobs,
    run_head_on,
    slice_rows,
)
from worker.engine.sampler import PendingSamples, Sampler, SamplerOutput, SamplingBatch
from worker.engine.scheduler import ScheduledSeq, SchedulerOutput
from worker.engine.sequence import Sequence
from worker.engine.step_link import StepHeader, receive_step, send_step, send_stop
from worker.layers.context import AttentionMetadata, set_attention_metadata
from worker.models.config import ModelConfig
from worker.models.cpu_packing import pack_cpu_weights

log = get_logger("engine")


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to sample from (one per sampling seq)
    sampling_seqs: list[Sequence]
    graph_batch: int | None = None  # the padded decode batch to replay, None for an eager step
    prefill_bucket: int | None = None  # the padded prefill chunk to replay, None for an eager step
    prompt_slices: list[PromptSlice] | None = None  # rank 0: the head's prompt-logprob slices, if any
    prompt_rows: np.ndarray | None = None  # other ranks: the rows of rank 0's prompt-logprob slices


def kv_cache_dtype(cfg: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: the model's dtype, or e4m3 for kv_cache_dtype "fp8"."""
    if cfg.kv_cache_dtype == "auto":
        return dtype
    if cfg.kv_cache_dtype == "fp8":
        return torch.float8_e4m3fn
    raise ValueError(f"kv_cache_dtype must be auto or fp8, got {cfg.kv_cache_dtype!r}")


def local_kv_heads(cfg: ModelConfig) -> int:
    """KV heads this rank holds (its share of the model's, or one replica)."""
    return head_shard(cfg.num_attention_heads, cfg.num_key_value_heads, tp_size(), tp_rank()).num_kv_heads


def local_heads(cfg: ModelConfig) -> int:
    """Query heads this rank holds (those of its KV heads, or its part of a replicated KV head's group)."""
    return head_shard(cfg.num_attention_heads, cfg.num_key_value_heads, tp_size(), tp_rank()).num_heads


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * local_kv_heads(cfg) * cfg.head_dim * elem


class _Buffer:
    """A pinned host array that numpy fills, and its device twin (the same tensor on a CPU)."""

    def __init__(self, shape: int | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=cuda)
        self.np = self.host.numpy()
        self.dev = torch.zeros(shape, dtype=dtype, device=device) if cuda else self.host

    def upload(self, rows: int) -> torch.Tensor:
        """Queues the copy of rows [:rows] (no wait) and returns their device view."""
        if self.dev is not self.host:
            self.dev[:rows].copy_(self.host[:rows], non_blocking=True)
        return self.dev[:rows]


class StepBuffers:
    """Every per-step input, sized once for the largest step, so a step allocates nothing."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device) -> None:
        i32, i64 = torch.int32, torch.int64
        self.input_ids = _Buffer(max_tokens, i64, device)
        self.positions = _Buffer(max_tokens, i64, device)
        self.slot_mapping = _Buffer(max_tokens, i64, device)
        self.logits_indices = _Buffer(max_seqs, i64, device)
        self.seq_lens = _Buffer(max_seqs, i32, device)
        self.query_start_loc = _Buffer(max_seqs + 1, i32, device)
        self.block_tables = _Buffer((max_seqs, max_blocks), i32, device)
        self.carried = _Buffer((2, max_seqs), i64, device)  # rows of the last samples -> rows of input_ids
        # The host arrays are rewritten next step: wait until the device has read this step's copies.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def wait_reusable(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def mark_copied(self) -> None:
        if self._copied is not None:
            self._copied.record()

    def static_inputs(self) -> StaticInputs:
        return StaticInputs(self.input_ids.dev, self.positions.dev, self.slot_mapping.dev, self.seq_lens.dev,
                            self.query_start_loc.dev, self.block_tables.dev)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig, cfg: EngineConfig,
                 dtype: torch.dtype, device: torch.device, max_model_len: int) -> None:
        self.model = model
        pack_cpu_weights(model)  # every rank's model, however it was made (a CPU's float32 weights only)
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.dtype = dtype
        self.kv_dtype = kv_cache_dtype(cfg, dtype)
        self.device = device
        self.block_size = cfg.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // cfg.block_size)
        self.sampler = Sampler()
        sizes = graph_batch_sizes(cfg.max_num_seqs) if cfg.use_decode_graphs() else []
        max_rows = max(cfg.max_num_seqs, *sizes) if sizes else cfg.max_num_seqs
        self.buffers = StepBuffers(max(cfg.max_num_batched_tokens, max_rows), max_rows,
                                   self.max_blocks_per_seq, device)
        self._block_cols = np.arange(self.max_blocks_per_seq)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.memory_profile: dict[str, float] | None = None  # what sized the KV cache, when profiled
        self.num_kv_heads = local_kv_heads(model_cfg)
        # Under tensor parallelism rank 0 sends each step to the other ranks (see step_link), once start-up
        # (which every rank runs alike) is over.
        self.linked = False
        # The last step's decode rows on a CPU (each sequence's order and computed tokens): _decodes_continue.
        self._last_decodes: tuple[list[int], np.ndarray] = ([], np.zeros(0, np.int64))

        # Every rank must hold the same blocks: the smallest count any rank has room for.
        self.num_blocks = int(agree([cfg.num_kv_blocks or self._default_num_blocks()])[0])
        # One block more than the block manager hands out: padding rows of a graph batch write there.
        self.scratch_block = self.num_blocks
        self.kv_cache = torch.zeros(
            model_cfg.num_hidden_layers, 2, self.num_blocks + 1, cfg.block_size,
            self.num_kv_heads, model_cfg.head_dim, dtype=self.kv_dtype, device=device,
        )
        model.bind_kv_cache(self.kv_cache)

        if sizes:
            self.graphs = DecodeGraphs(model, self.buffers.static_inputs(), sizes, max_model_len,
                                       model_cfg.hidden_size, dtype, device)
            buckets = prefill_token_buckets(cfg.max_num_batched_tokens) if cfg.prefill_graphs else []
            if buckets:
                self.prefill_graphs = PrefillGraphs(model, self.buffers.static_inputs(), buckets, max_model_len,
                                                    model_cfg.hidden_size, dtype, device)
            if device.type == "cuda":
                self._capture_graphs()
        if use_triton(self.kv_cache):
            self._compile_attention_variants()

    # ---- start-up ----------------------------------------------------------------------------------

    def _default_num_blocks(self) -> int:
        per_block = kv_block_bytes(self.model_cfg, self.block_size, self.kv_dtype)
        if self.device.type == "cuda":
            return self._profile_num_blocks(per_block)
        num_blocks = int(self.cfg.kv_cache_memory_gb * 2**30 // per_block)
        if num_blocks < self.max_blocks_per_seq:
            # A sequence that outgrows the cache could never finish: refuse to start, as the GPU path does.
            need_gb = self.max_blocks_per_seq * per_block / 2**30
            raise ConfigError("kv_cache_memory_gb", (
                f"must hold one sequence of max_model_len {self.max_model_len} ({self.max_blocks_per_seq} blocks, "
                f"{need_gb:.3g} GiB), got {self.cfg.kv_cache_memory_gb} GiB ({num_blocks} blocks); raise it or lower "
                "max_model_len"))
        return num_blocks

    def _profile_num_blocks(self, per_block: int) -> int:
        """Runs one dummy step of max_num_batched_tokens (sampling included) to measure the activation
        peak, then gives the KV cache what is left of gpu_memory_utilization of the GPU's memory."""
        dev, cfg = self.device, self.model_cfg
        # Every dummy sequence writes the same few blocks: their values do not matter here.
        scratch = torch.zeros(cfg.num_hidden_layers, 2, self.max_blocks_per_seq, self.block_size,
                              self.num_kv_heads, cfg.head_dim, dtype=self.kv_dtype, device=dev)
        self.model.bind_kv_cache(scratch)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        sched = self._dummy_schedule()
        self.execute(sched, _profile_sampling_batch)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - scratch.numel() * scratch.element_size()
        self.release()
        del scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        # Memory torch does not manage (CUDA context, library workspaces, other processes) counts too.
        non_torch = total - free - torch.cuda.memory_reserved(dev)
        budget = total * self.cfg.gpu_memory_utilization - peak - non_torch
        num_blocks = int(budget // per_block)
        gib = 2**30
        self.memory_profile = {"gpu_gib": total / gib, "peak_weights_and_activations_gib": peak / gib,
                               "outside_torch_gib": non_torch / gib, "kv_cache_gib": num_blocks * per_block / gib,
                               "num_blocks": num_blocks, "gpu_memory_utilization": self.cfg.gpu_memory_utilization}
        log.info("KV cache sized", **{k: round(v, 3) for k, v in self.memory_profile.items()})
        if num_blocks < self.max_blocks_per_seq:
            raise ConfigError("gpu_memory_utilization", (
                f"{self.cfg.gpu_memory_utilization} leaves the KV cache {max(num_blocks, 0)} blocks; one sequence of "
                f"max_model_len {self.max_model_len} needs {self.max_blocks_per_seq}: raise it or lower "
                "max_model_len or max_num_batched_tokens"))
        return num_blocks

    def _dummy_schedule(self) -> SchedulerOutput:
        """The largest step the scheduler may produce: max_num_batched_tokens spread over as many
        sequences as it may run, each sampling, all within max_model_len."""
        total = self.cfg.max_num_batched_tokens
        n = min(max(min(self.cfg.max_num_seqs, total), -(-total // self.max_model_len)), total)
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
        items = []
        for i in range(n):
            length = total // n + (i < total % n)
            seq = Sequence(f"profile-{i}", [0] * length, params)
            seq.block_table = list(range(-(-length // self.block_size)))
            items.append(ScheduledSeq(seq, length))
        return SchedulerOutput(scheduled=items, preempted=[], num_batched_tokens=total)

    def _compile_attention_variants(self) -> None:
        from tokenq_kernels.attention_triton import compile_step_variants

        t0 = time.perf_counter()
        launches = compile_step_variants(self.kv_cache[0, 0], self.kv_cache[0, 1], local_heads(self.model_cfg),
                                         self.dtype)
        log.info("compiled attention variants for eager steps", variants=launches,
                 seconds=round(time.perf_counter() - t0, 1))

    def _capture_graphs(self) -> None:
        assert self.graphs is not None
        b = self.graphs.max_batch
        self._fill_padding(0, b)
        for buf in (self.buffers.input_ids, self.buffers.positions, self.buffers.slot_mapping,
                    self.buffers.seq_lens, self.buffers.block_tables):
            buf.upload(b)
        self.buffers.query_start_loc.upload(b + 1)
        t0 = time.perf_counter()
        self.graphs.capture()
        log.info("captured CUDA graphs for decode batches", graphs=len(self.graphs.sizes), max_batch=b,
                 seconds=round(time.perf_counter() - t0, 1))
        if self.prefill_graphs is not None:
            t = self.prefill_graphs.sizes[-1]
            self._fill_prefill_padding(0, t)  # one real token (query_start_loc 0, 1 from above), the rest padding
            for buf in (self.buffers.input_ids, self.buffers.positions, self.buffers.slot_mapping):
                buf.upload(t)
            t0 = time.perf_counter()
            self.prefill_graphs.capture()
            log.info("captured CUDA graphs for prefill chunks", graphs=len(self.prefill_graphs.sizes),
                     max_tokens=t, seconds=round(time.perf_counter() - t0, 1))
        self._keep_fastest_buckets()

    @property
    def graph_sets(self) -> dict[str, DecodeGraphs | PrefillGraphs]:
        """The captured graphs by kind ("decode", "prefill"); none on a CPU."""
        sets = {"decode": self.graphs, "prefill": self.prefill_graphs}
        return {name: graphs for name, graphs in sets.items() if graphs is not None}

    @property
    def bucket_times(self) -> dict[str, dict[int, float]]:
        """Graph replay times (ms) by kind and bucket, for the graphs that were timed."""
        return {name: graphs.times for name, graphs in self.graph_sets.items() if graphs.times}

    def _keep_fastest_buckets(self) -> None:
        """Drops the graph buckets that a larger bucket replays faster than (the buffers hold padding). Every
        rank replays the same graphs and decides on the slowest rank's times, so all keep the same buckets."""
        for name, graphs in self.graph_sets.items():
            t0 = time.perf_counter()
            times = graphs.keep_fastest(combine=lambda values: agree(values, "max"))
            dropped = sorted(set(times) - set(graphs.sizes))
            log.info("timed graphs; dropped those slower than a larger bucket", graphs=len(times), kind=name,
                     seconds=round(time.perf_counter() - t0, 1),
                     dropped={s: round(times[s], 2) for s in dropped})

    def release(self) -> None:
        """Frees the KV cache and the graphs, keeping the model (which may serve another engine)."""
        cfg = self.model_cfg
        self.model.bind_kv_cache(torch.empty(cfg.num_hidden_layers, 2, 0, self.block_size,
                                             self.num_kv_heads, cfg.head_dim, dtype=self.kv_dtype,
                                             device=self.device))
        self.graphs = None
        self.prefill_graphs = None
        self.kv_cache = None  # type: ignore[assignment]

    # ---- one step ----------------------------------------------------------------------------------

    def _fill_padding(self, start: int, end: int) -> None:
        """Rows [start:end] of a graph batch: one token at position 0 of the scratch block, harmless."""
        x = self.buffers
        x.input_ids.np[start:end] = 0
        x.positions.np[start:end] = 0
        x.slot_mapping.np[start:end] = self.scratch_block * self.block_size
        x.seq_lens.np[start:end] = 1
        x.block_tables.np[start:end, 0] = self.scratch_block
        x.query_start_loc.np[: end + 1] = np.arange(end + 1)

    def _fill_prefill_padding(self, start: int, end: int) -> None:
        """Token rows [start:end] of a padded prefill chunk: token 0 at position 0, into the scratch block."""
        x = self.buffers
        x.input_ids.np[start:end] = 0
        x.positions.np[start:end] = 0
        x.slot_mapping.np[start:end] = self.scratch_block * self.block_size

    def prepare(self, sched: SchedulerOutput, previous: torch.Tensor | None = None) -> StepInputs:
        """Fills and uploads the step's inputs; `previous` holds the last step's sampled token ids on the
        device, the input ids of sequences whose `pending` row points into it."""
        x = self.buffers
        x.wait_reusable()
        items = sched.scheduled
        seqs = [item.seq for item in items]
        S = len(items)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, S)
        counts = np.fromiter((item.num_new_tokens for item in items), np.int64, S)
        ends = starts + counts
        cu = np.zeros(S + 1, np.int64)
        np.cumsum(counts, out=cu[1:])
        T = int(cu[-1])
        not_one = np.flatnonzero(counts != 1)
        num_decodes = int(not_one[0]) if len(not_one) else S
        graph_batch = self.graphs.bucket(S) if self.graphs is not None and num_decodes == S else None
        prefill_bucket = None
        if self.prefill_graphs is not None and S == 1 and num_decodes == 0:
            prefill_bucket = self.prefill_graphs.bucket(T)

        ids, pos = x.input_ids.np[:T], x.positions.np[:T]
        ids[:] = np.fromiter(chain.from_iterable(
            s.token_ids[a:e] for s, a, e in zip(seqs, starts.tolist(), ends.tolist(), strict=True)), np.int64, T)
        pos[:] = np.arange(T) + np.repeat(starts - cu[:-1], counts)
        lens = np.fromiter((len(s.block_table) for s in seqs), np.int64, S)
        tables = x.block_tables.np[:S]
        # Columns past a sequence's own blocks keep stale (valid) ids: attention never reads past seq_len.
        tables[self._block_cols < lens[:, None]] = np.fromiter(
            chain.from_iterable(s.block_table for s in seqs), np.int32, int(lens.sum()))
        rows = np.repeat(np.arange(S), counts)
        x.slot_mapping.np[:T] = tables[rows, pos // self.block_size].astype(np.int64) * self.block_size + (
            pos % self.block_size)
        x.seq_lens.np[:S] = ends
        x.query_start_loc.np[: S + 1] = cu
        samples = np.fromiter((item.samples for item in items), bool, S)
        num_samples = int(samples.sum())
        decodes_continue = self.device.type == "cpu" and self._decodes_continue(seqs[:num_decodes],
                                                                                 starts[:num_decodes])
        x.logits_indices.np[:num_samples] = cu[1:][samples] - 1
        n_tok, n_seq = T, S
        if graph_batch is not None:
            self._fill_padding(S, graph_batch)
            n_tok = n_seq = graph_batch
        elif prefill_bucket is not None:
            self._fill_prefill_padding(T, prefill_bucket)
            n_tok = prefill_bucket
        meta = AttentionMetadata(
            slot_mapping=x.slot_mapping.upload(n_tok),
            query_start_loc=x.query_start_loc.upload(n_seq + 1)[: S + 1],
            seq_lens=x.seq_lens.upload(n_seq)[:S],
            block_tables=x.block_tables.upload(n_seq)[:S],
            max_query_len=int(counts.max()),
            max_seq_len=int(ends.max()),
            num_decodes=num_decodes,
            query_start_loc_cpu=cu.tolist(),
            seq_lens_cpu=ends.tolist(),
            decodes_continue=decodes_continue,
        )
        inputs = StepInputs(
            input_ids=x.input_ids.upload(n_tok)[:T],
            positions=x.positions.upload(n_tok)[:T],
            meta=meta,
            logits_indices=x.logits_indices.upload(num_samples),
            sampling_seqs=[s for s, keep in zip(seqs, samples.tolist(), strict=True) if keep],
            graph_batch=graph_batch,
            prefill_bucket=prefill_bucket,
            prompt_slices=plan_prompt_logprobs(items, meta.query_start_loc_cpu),
        )
        pending = np.fromiter((s.pending for s in seqs[:num_decodes]), np.int64, num_decodes)
        dst = np.flatnonzero(pending >= 0)
        if len(dst):
            if previous is None:
                raise RuntimeError("a sequence waits for a sampled token but no step is in flight")
            self._carry_tokens(inputs.input_ids, previous, dst, pending[dst])
        if self.linked:
            header = StepHeader(1, T, S, n_tok, n_seq, num_samples, graph_batch or 0, prefill_bucket or 0,
                                meta.max_query_len, meta.max_seq_len, num_decodes, max(1, int(lens.max())),
                                len(inputs.prompt_slices), int(decodes_continue))
            send_step(header, x, x.input_ids.dev[:n_tok], slice_rows(inputs.prompt_slices))
        x.mark_copied()
        return inputs

    def _decodes_continue(self, decodes: list[Sequence], starts: np.ndarray) -> bool:
        """Whether this step's decode rows are the last step's, in order, each one token further (read by the
        CPU attention's dense copy, tokenq_kernels.dense_decode)."""
        orders = [s.order for s in decodes]
        last_orders, last_starts = self._last_decodes
        self._last_decodes = (orders, starts)
        return bool(orders) and orders == last_orders and np.array_equal(starts, last_starts + 1)

    def _received_inputs(self, h: StepHeader, prompt_rows: np.ndarray) -> StepInputs:
        """Ranks other than 0: the step rank 0 sent, from the buffers step_link filled, uploaded alike."""
        x = self.buffers
        T, S, n_tok, n_seq = h.num_tokens, h.num_seqs, h.padded_tokens, h.padded_seqs
        meta = AttentionMetadata(
            slot_mapping=x.slot_mapping.upload(n_tok),
            query_start_loc=x.query_start_loc.upload(n_seq + 1)[: S + 1],
            seq_lens=x.seq_lens.upload(n_seq)[:S],
            block_tables=x.block_tables.upload(n_seq)[:S],
            max_query_len=h.max_query_len,
            max_seq_len=h.max_seq_len,
            num_decodes=h.num_decodes,
            query_start_loc_cpu=x.query_start_loc.np[: S + 1].tolist(),
            seq_lens_cpu=x.seq_lens.np[:S].tolist(),
            decodes_continue=bool(h.decodes_continue),
        )
        inputs = StepInputs(
            input_ids=x.input_ids.dev[:T],
            positions=x.positions.upload(n_tok)[:T],
            meta=meta,
            logits_indices=x.logits_indices.upload(h.num_samples),
            sampling_seqs=[],
            graph_batch=h.graph_batch or None,
            prefill_bucket=h.prefill_bucket or None,
            prompt_rows=prompt_rows,
        )
        x.mark_copied()
        return inputs

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks other than 0: run every step rank 0 sends, until it stops."""
        while (step := receive_step(self.buffers)) is not None:
            header, prompt_rows = step
            inputs = self._received_inputs(header, prompt_rows)
            hidden = self._forward(inputs)
            # The LM head gathers the vocabulary over every rank: run it where rank 0 does, in its order.
            run_head_on(prompt_rows, hidden, self.model.compute_logits)
            if header.num_samples:
                self.model.compute_logits(hidden[inputs.logits_indices])

    def stop_followers(self) -> None:
        """Rank 0: the other ranks leave `follow`."""
        if self.linked:
            self.linked = False
            send_stop()

    def _carry_tokens(self, input_ids: torch.Tensor, previous: torch.Tensor, dst: np.ndarray,
                      src: np.ndarray) -> None:
        """input_ids[dst] = previous[src] on the device (decode rows are one token each, so a decode's
        row is its token's index). In steady decoding both are 0..k-1: one copy, no index upload."""
        k = len(dst)
        if dst[-1] == k - 1 and np.array_equal(src, dst):
            input_ids[:k].copy_(previous[:k])
            return
        c = self.buffers.carried
        c.np[0, :k], c.np[1, :k] = dst, src
        idx = c.upload(2)
        input_ids.index_copy_(0, idx[0, :k], previous.index_select(0, idx[1, :k]))

    @torch.inference_mode()
    def launch(
        self, sched: SchedulerOutput, batch_for: Callable[[list[Sequence]], SamplingBatch],
        previous: PendingSamples | None = None,
    ) -> tuple[list[Sequence], PendingSamples | None]:
        """Queues one step on the device without waiting for it; returns the sequences that sample and
        their samples to come (in the same order). `previous` is the step still in flight, if any."""
        inputs = self.prepare(sched, previous.token_ids if previous is not None else None)
        hidden = self._forward(inputs)
        if inputs.prompt_slices:
            fill_prompt_logprobs(sched.scheduled, inputs.prompt_slices, hidden, self.model.compute_logits)
        if not inputs.sampling_seqs:
            return [], None
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return inputs.sampling_seqs, self.sampler.sample(logits, batch_for(inputs.sampling_seqs))

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.graph_batch is not None:
            assert self.graphs is not None
            return self.graphs.run(inputs.graph_batch)
        if inputs.prefill_bucket is not None:
            assert self.prefill_graphs is not None
            return self.prefill_graphs.run(inputs.prefill_bucket, inputs.meta)
        with set_attention_metadata(inputs.meta):
            return self.model(inputs.input_ids, inputs.positions)

    def execute(
        self, sched: SchedulerOutput, batch_for: Callable[[list[Sequence]], SamplingBatch]
    ) -> tuple[list[Sequence], SamplerOutput | None]:
        """Runs one step and waits for its samples (profiling, tests)."""
        seqs, pending = self.launch(sched, batch_for)
        return seqs, pending.result() if pending is not None else None


def _profile_sampling_batch(seqs: list[Sequence]) -> SamplingBatch:
    """Top-k and top-p on every row: the sampler's most memory-hungry path."""
    n = len(seqs)
    return SamplingBatch(params=[s.sampling for s in seqs], output_token_ids=[[] for _ in range(n)],
                         prompt_token_ids=[[] for _ in range(n)], generators=[None] * n,
                         stop_ids_until_min=[set() for _ in range(n)])

