"""Random-weight models of named shapes, and transformers' model over the very same tensors."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from worker.layers.context import AttentionMetadata, set_attention_metadata  # noqa: E402
from worker.models.random_weights import SHAPES, hf_peer, random_model, shape_config  # noqa: E402


def _our_logits(model, mcfg, ids: list[int]) -> torch.Tensor:
    """One prefill of the whole sequence through our paged attention."""
    bs = 16
    n_blocks = -(-len(ids) // bs)
    kv = torch.zeros(mcfg.num_hidden_layers, 2, n_blocks, bs, mcfg.num_key_value_heads, mcfg.head_dim)
    model.bind_kv_cache(kv)
    n = len(ids)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(n_blocks, dtype=torch.int32)[None], max_query_len=n, max_seq_len=n,
        num_decodes=0, query_start_loc_cpu=[0, n], seq_lens_cpu=[n],
    )
    with torch.inference_mode(), set_attention_metadata(meta):
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n)))


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_peer_shares_weights_and_agrees(tied):
    config = shape_config("tiny", tie_word_embeddings=tied)
    model, mcfg = random_model(config, torch.float32, "cpu", seed=7)
    hf = hf_peer(model, config)
    ours = dict(model.named_parameters())
    theirs = dict(hf.named_parameters())
    # No second copy: every transformers weight lives inside one of ours.
    our_storages = {p.untyped_storage().data_ptr() for p in ours.values()}
    assert all(p.untyped_storage().data_ptr() in our_storages for p in theirs.values())
    assert not any(t.is_meta for t in [*hf.parameters(), *hf.buffers()])
    ids = torch.randint(0, config["vocab_size"], (57,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_our_logits(model, mcfg, ids), ref, rtol=1e-4, atol=1e-4)
    assert ref.std() > 0.5  # logits of order one: greedy choices are not coin flips


def test_shapes():
    c = shape_config("llama3-8b")
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
            c["intermediate_size"], c["vocab_size"], c["rope_theta"]) == (4096, 32, 32, 8, 14336, 128256, 500000.0)
    with pytest.raises(ValueError, match="unknown model shape"):
        shape_config("llama-9000")
    assert set(SHAPES) >= {"llama3-8b", "small", "tiny"}
