"""The Llama family (Llama 2/3/3.x, Mistral, Qwen2/2.5, SmolLM2) over flattened tokens and a paged KV cache.

Names mirror Hugging Face's (model.layers.N.self_attn...), with q/k/v and gate/up fused into one matmul each.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from worker.engine.distributed import head_shard, tp_size
from worker.layers.activation import SiluAndMul
from worker.layers.attention import Attention
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.layers.norm import RMSNorm
from worker.layers.rotary import RotaryEmbedding
from worker.models.config import ModelConfig

# (our fused parameter, checkpoint name, shard id)
_STACKED = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads, bias=cfg.qkv_bias
        )
        shard = self.qkv_proj.shard
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, bias=cfg.o_proj_bias,
                                        input_shard=(shard.q_start * d, shard.num_heads * d))
        self.q_size = self.qkv_proj.num_heads * d
        self.kv_size = self.qkv_proj.num_kv_heads * d
        rotary_emb = RotaryEmbedding(d, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d, d**-0.5, rotary_emb)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v, positions))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [i, i], bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act_fn = SiluAndMul()
        self.act_fn.quantize_output = self.down_proj.quant_method.takes_quantized_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A norm that feeds FP8 linears only quantizes its output in the same kernel.
        self.input_layernorm.quantize_output = self.self_attn.qkv_proj.quant_method.takes_quantized_input
        self.post_attention_layernorm.quantize_output = self.mlp.gate_up_proj.quant_method.takes_quantized_input
        # The norms' weights are the gains of qkv's and gate/up's input channels, which FP8 quantization weighs
        # each column's rounding error by (quantization/fp8_weight.py). A plain tensor sharing the parameter's
        # storage, so the linear does not register the norm's weight as its own; loading copies into it in place.
        self.self_attn.qkv_proj.input_gain = self.input_layernorm.weight.data
        self.mlp.gate_up_proj.input_gain = self.post_attention_layernorm.weight.data

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add of each block is fused into the next norm.
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        head_shard(cfg.num_attention_heads, cfg.num_key_value_heads, tp_size(), 0)  # raises if they cannot split
        with _default_dtype(dtype):  # parameters are created directly in the target dtype
            self.model = LlamaModel(cfg)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flattened tokens of every sequence in the step -> hidden states [T, hidden].

        Reads the step's AttentionMetadata from worker.layers.context."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (usually each sequence's last token) -> logits [N, vocab] in the head's dtype:
        a greedy argmax needs no float32 copy of a large batch's logits; what computes with them widens."""
        return self.lm_head(hidden)

    def bind_kv_cache(self, kv: torch.Tensor) -> None:
        """kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; each layer gets views of it."""
        layers = self.model.layers
        if kv.shape[0] != len(layers):
            raise ValueError(f"KV cache has {kv.shape[0]} layers, the model {len(layers)}")
        for i, layer in enumerate(layers):
            layer.self_attn.attn.bind_cache(kv[i, 0], kv[i, 1])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies Hugging Face-named tensors into our (fused, sharded) parameters; each is cast on copy."""
        params = dict(self.named_parameters())  # a tied lm_head.weight appears once, as the embedding
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb." in name:  # inv_freq / cos / sin buffers that some checkpoints carry
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            shard_id = None
            for fused, original, sid in _STACKED:
                if f".{original}." in name:
                    name, shard_id = name.replace(f".{original}.", f".{fused}."), sid
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the model")
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor, shard_id)
            else:
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                param.data.copy_(tensor)
            loaded.add(name)
        missing = {n for n in set(params) - loaded if not getattr(params[n], "optional_in_checkpoint", False)}
        if missing:
            raise ValueError(f"checkpoint lacks weights for {sorted(missing)[:5]} ({len(missing)} in all)")
