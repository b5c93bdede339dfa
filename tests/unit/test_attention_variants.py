"""The start-up compile of attention variants covers every tile height a step can ask for; split-K cuts a short
context into partitions of one key tile."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tokenq_kernels.attention_triton import (  # noqa: E402
    MAX_SPLITS,
    choose_num_splits,
    launch_config,
    variant_query_lengths,
)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_query_length_uses_a_compiled_tile_height(group: int, dtype: torch.dtype) -> None:
    lengths = variant_query_lengths(group, dtype)
    assert all(launch_config(q, group, dtype).block_q == b for b, q in lengths.items())
    for q in range(1, 8193):
        assert launch_config(q, group, dtype).block_q in lengths, (q, group)


def test_split_k_cuts_a_short_context_into_one_tile_a_partition() -> None:
    fp8_decode = launch_config(1, 4, torch.bfloat16, kv_fp8=True)
    bf16_decode = launch_config(1, 4, torch.bfloat16)
    assert (fp8_decode.block_n, fp8_decode.split_keys) == (64, 32)
    assert bf16_decode.split_keys == bf16_decode.block_n == 64
    # One sequence, 8 KV heads, 132 SMs: a 384-token context in 32- or 64-key partitions.
    assert choose_num_splits(8, 384, 132, fp8_decode.split_keys) == 12
    assert choose_num_splits(8, 384, 132, bf16_decode.split_keys) == 6
    assert choose_num_splits(8, 8192, 132, 32) == 33  # long contexts: about two programs per SM
    assert choose_num_splits(2, 1 << 20, 132, 32) == MAX_SPLITS
    assert choose_num_splits(132, 8192, 132, 32) == 1  # a full grid is not split
    assert choose_num_splits(8, 20, 132, 32) == 1
