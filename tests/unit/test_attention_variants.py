"""The start-up compile of attention variants covers every tile height a step can ask for."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tokenq_kernels.attention_triton import launch_config, variant_query_lengths  # noqa: E402


@pytest.mark.parametrize("group", [1, 2, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_query_length_uses_a_compiled_tile_height(group: int, dtype: torch.dtype) -> None:
    lengths = variant_query_lengths(group, dtype)
    assert all(launch_config(q, group, dtype).block_q == b for b, q in lengths.items())
    for q in range(1, 8193):
        assert launch_config(q, group, dtype).block_q in lengths, (q, group)
