"""The CPU decode's dense copy of the decoding sequences' keys and values, step after step, against attention
computed from the paged cache alone (the gather path), on fresh random inputs every run."""

from __future__ import annotations

import math

import torch

from tokenq_kernels.attention import paged_attention_ref
from tokenq_kernels.attention_metadata import AttentionMetadata
from tokenq_kernels.dense_decode import DenseDecodeKV
from tokenq_kernels.fp8 import FP8
from tokenq_kernels.kv_cache import store_kv_ref
from worker.layers.attention import Attention

BS, HKV, GROUP, D = 16, 3, 3, 64


class _Paged:
    """Sequences in a paged cache with random blocks, growing one token a decode step."""

    def __init__(self, lens: list[int], num_blocks: int = 512, dtype: torch.dtype = torch.float32):
        self.k = torch.randn(num_blocks, BS, HKV, D).to(dtype)
        self.v = torch.randn(num_blocks, BS, HKV, D).to(dtype)
        self.free = torch.randperm(num_blocks).tolist()
        self.lens = list(lens)
        self.blocks: list[list[int]] = [[self.free.pop() for _ in range(-(-n // BS))] for n in lens]

    def decode_step(self, rows: list[int], continues: bool, host_bound: int | None = None
                    ) -> tuple[torch.Tensor, AttentionMetadata, tuple]:
        """One decode token for each of `rows` (in that order): stored in the cache; returns q, meta, (k, v).
        With host_bound the host lengths are only that bound, as in a padded (graph) batch's metadata."""
        slots = []
        for r in rows:
            pos = self.lens[r]
            if pos % BS == 0:
                self.blocks[r].append(self.free.pop())
            self.lens[r] += 1
            slots.append(self.blocks[r][pos // BS] * BS + pos % BS)
        S = len(rows)
        width = max(max(len(self.blocks[r]) for r in rows), -(-(host_bound or 0) // BS))  # stale ids past a row
        bt = torch.zeros(S, width, dtype=torch.int32)
        for i, r in enumerate(rows):
            bt[i, : len(self.blocks[r])] = torch.tensor(self.blocks[r])
        lens = [self.lens[r] for r in rows]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots), query_start_loc=torch.arange(S + 1, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=bt, max_query_len=1,
            max_seq_len=host_bound or max(lens), num_decodes=S, query_start_loc_cpu=list(range(S + 1)),
            seq_lens_cpu=[host_bound] * S if host_bound else lens,
            decodes_continue=continues)
        k_new, v_new = torch.randn(S, HKV, D), torch.randn(S, HKV, D)
        store_kv_ref(k_new, v_new, self.k, self.v, meta.slot_mapping)
        return torch.randn(S, HKV * GROUP, D), meta, (k_new.to(self.k.dtype).float(), v_new.to(self.v.dtype).float())


def _both(paged: _Paged, dense: DenseDecodeKV, q, meta, kv) -> tuple[torch.Tensor, torch.Tensor]:
    scale = 1 / math.sqrt(D)
    gathered = paged_attention_ref(q, paged.k, paged.v, meta, scale)
    return paged_attention_ref(q, paged.k, paged.v, meta, scale, *kv, dense=dense), gathered


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err < 1e-5, err


def _reserved(paged: _Paged) -> DenseDecodeKV:
    dense = DenseDecodeKV()
    dense.reserve(paged.k)  # as an attention layer does when it binds its cache
    return dense


class _Counting(DenseDecodeKV):
    copies = 0

    def _copy_from_cache(self, *args) -> None:
        self.copies += 1
        super()._copy_from_cache(*args)


def test_a_run_of_steps_appends_and_matches_the_paged_cache():
    """Rows of different lengths decode for 150 steps: every step matches attention over the paged cache, and
    the copy is made from the cache once (its view gives the rows all the room its store holds)."""
    paged = _Paged([40, 57, 33, 61])
    dense = _Counting()
    dense.reserve(paged.k)
    for step in range(150):
        _close(*_both(paged, dense, *paged.decode_step([0, 1, 2, 3], continues=step > 0)))
    assert dense.lens == paged.lens
    assert dense.copies == 1


def test_changed_rows_or_a_missed_step_copy_again_instead_of_trusting_the_flag():
    paged = _Paged([20, 30, 25])
    dense = _reserved(paged)
    for step in range(3):
        _close(*_both(paged, dense, *paged.decode_step([0, 1, 2], continues=step > 0)))
    # A row leaves: the runner says the rows do not continue.
    _close(*_both(paged, dense, *paged.decode_step([0, 2], continues=False)))
    _close(*_both(paged, dense, *paged.decode_step([0, 2], continues=True)))
    # A step that this layer's copy did not see (rows 0 and 2 advance twice): the flag alone would be wrong,
    # the lengths tell.
    paged.decode_step([0, 2], continues=True)
    _close(*_both(paged, dense, *paged.decode_step([0, 2], continues=True)))
    # The rows swap order: the flag is off, and the copy follows.
    _close(*_both(paged, dense, *paged.decode_step([2, 0], continues=False)))


def test_where_the_copy_does_not_apply_the_gather_answers():
    # Lengths so spread that padding to the longest would more than double the work.
    paged = _Paged([3, 4, 90])
    dense = _reserved(paged)
    q, meta, kv = paged.decode_step([0, 1, 2], continues=False)
    assert dense.attend(q, *kv, paged.k, paged.v, meta, 1 / math.sqrt(D)) is None
    _close(*_both(paged, dense, q, meta, kv))
    # An FP8 cache: the gather path reads what the cache holds.
    paged = _Paged([20, 22], dtype=FP8)
    q, meta, kv = paged.decode_step([0, 1], continues=False)
    assert _reserved(paged).attend(q, *kv, paged.k, paged.v, meta, 1 / math.sqrt(D)) is None
    # A copy larger than a quarter of the paged cache (2 rows of 64 columns against 480 / 4 tokens).
    paged = _Paged([60, 60], num_blocks=30)
    dense = _reserved(paged)
    q, meta, kv = paged.decode_step([0, 1], continues=False)
    assert dense.attend(q, *kv, paged.k, paged.v, meta, 1 / math.sqrt(D)) is None
    assert dense.k is None


def test_a_layer_reserves_the_copys_memory_when_it_binds_its_cache_and_steps_allocate_none():
    """The store is taken, zeroed, at bind (a buffer first touched mid-run costs a fault per page); each
    step's copy is a view of it. An FP8 cache reserves nothing."""
    paged = _Paged([40, 57, 33, 61])
    layer = Attention(HKV * GROUP, HKV, D, 1 / math.sqrt(D))
    layer.bind_cache(paged.k, paged.v)
    dense = layer.dense_decode
    store = dense._store
    assert store is not None and store.shape == (2, paged.k.numel() // 4) and not store.any()
    for step in range(3):
        _close(*_both(paged, dense, *paged.decode_step([0, 1, 2, 3], continues=step > 0)))
        assert dense.k is not None and dense.k.untyped_storage().data_ptr() == store.untyped_storage().data_ptr()
    layer.bind_cache(paged.k.to(FP8), paged.v.to(FP8))
    assert layer.dense_decode._store is None


def test_a_padded_batch_whose_host_lengths_are_only_a_bound_reads_the_real_ones():
    """Decode batches padded to a graph bucket carry max_model_len as every host length; the copy must still
    attend over each row's real context (a row past it would read stale blocks)."""
    paged = _Paged([20, 33, 27])
    dense = _reserved(paged)
    for _ in range(4):
        _close(*_both(paged, dense, *paged.decode_step([0, 1, 2], continues=False, host_bound=96)))


def test_an_engine_appends_while_its_rows_continue_and_generates_what_the_gather_does(monkeypatch):
    """A CPU engine's runner tells the layers when a step's decode rows continue the last step's: over a run of
    prompts that finish at different steps, each layer copies from the paged cache only when the rows change,
    and the greedy tokens equal the gather path's."""
    import numpy as np

    from protocol.sampling import SamplingParams
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.models.random_weights import random_model, shape_config

    model, mcfg = random_model(shape_config("tiny"), torch.float32, "cpu", seed=5)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 512, size=int(n)).tolist() for n in (30, 34, 38)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (20, 12, 16)]

    def run() -> list[list[int]]:
        engine = LLMEngine.from_model(model, mcfg, EngineConfig(block_size=4, num_kv_blocks=1024, max_model_len=96))
        return [o.new_token_ids for o in engine.generate(prompts, params)]

    copies, appends = [], []
    real_copy, real_attend = DenseDecodeKV._copy_from_cache, DenseDecodeKV.attend
    monkeypatch.setattr(DenseDecodeKV, "_copy_from_cache", lambda self, *a: copies.append(1) or real_copy(self, *a))
    monkeypatch.setattr(DenseDecodeKV, "attend", lambda self, *a: appends.append(1) or real_attend(self, *a))
    dense = run()
    layers = mcfg.num_hidden_layers
    # Rows change three times (all three start decoding, then two finish): a copy per layer each time.
    assert len(copies) == 3 * layers and len(appends) > 5 * len(copies)
    monkeypatch.setattr(DenseDecodeKV, "attend", lambda self, *a: None)
    assert run() == dense
