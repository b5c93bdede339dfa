"""Carries each step's inputs from rank 0 to the other ranks as flat int tensors (no pickling per step).

Rank 0 fills its step buffers (model_runner.StepBuffers) and sends, on the host (gloo) group, a fixed
header and one int64 payload of the host arrays the step needs (and the rows of its prompt-logprob slices,
which every rank's LM head must run); the input ids go on the device group
instead, after rank 0 has carried the previous step's samples into them on its device (the other ranks
never see the samples). Each other rank writes what it receives into its own buffers, uploads them like
rank 0 and runs the same step, replaying its own CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from worker.engine.distributed import cpu_group

_STEP, _STOP = 1, 0
_FIELDS = ("kind", "num_tokens", "num_seqs", "padded_tokens", "padded_seqs", "num_samples", "graph_batch",
           "prefill_bucket", "max_query_len", "max_seq_len", "num_decodes", "block_cols", "prompt_slices",
           "decodes_continue")


@dataclass
class StepHeader:
    """What a step's shape is; 0 stands for None in graph_batch and prefill_bucket."""

    kind: int
    num_tokens: int
    num_seqs: int
    padded_tokens: int
    padded_seqs: int
    num_samples: int
    graph_batch: int
    prefill_bucket: int
    max_query_len: int
    max_seq_len: int
    num_decodes: int
    block_cols: int
    prompt_slices: int
    decodes_continue: int  # 0 or 1: AttentionMetadata.decodes_continue

    def tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f) for f in _FIELDS], dtype=torch.int64)

    @property
    def payload_size(self) -> int:
        t, s = self.padded_tokens, self.padded_seqs
        return 2 * t + s + (s + 1) + self.num_samples + s * self.block_cols + 2 * self.prompt_slices


def send_stop() -> None:
    header = torch.zeros(len(_FIELDS), dtype=torch.int64)
    header[0] = _STOP
    dist.broadcast(header, 0, group=cpu_group())


def send_step(header: StepHeader, buffers, input_ids: torch.Tensor, prompt_rows: np.ndarray) -> None:
    """Rank 0: the step whose host arrays are in `buffers`, whose input ids are `input_ids` (device) and
    whose prompt-logprob slices cover `prompt_rows` ([first, end) row pairs)."""
    t, s, cols = header.padded_tokens, header.padded_seqs, header.block_cols
    x = buffers
    payload = np.concatenate([
        x.positions.np[:t], x.slot_mapping.np[:t], x.seq_lens.np[:s], x.query_start_loc.np[: s + 1],
        x.logits_indices.np[: header.num_samples], x.block_tables.np[:s, :cols].reshape(-1), prompt_rows.reshape(-1),
    ]).astype(np.int64, copy=False)
    dist.broadcast(header.tensor(), 0, group=cpu_group())
    dist.broadcast(torch.from_numpy(payload), 0, group=cpu_group())
    dist.broadcast(input_ids, 0)


def receive_step(buffers) -> tuple[StepHeader, np.ndarray] | None:
    """Other ranks: the next step's header and its prompt-logprob rows ([first, end) pairs), its arrays
    written into `buffers` (host) and its input ids into buffers.input_ids.dev; None when rank 0 stops."""
    raw = torch.empty(len(_FIELDS), dtype=torch.int64)
    dist.broadcast(raw, 0, group=cpu_group())
    header = StepHeader(*raw.tolist())
    if header.kind == _STOP:
        return None
    payload = torch.empty(header.payload_size, dtype=torch.int64)
    dist.broadcast(payload, 0, group=cpu_group())
    p = payload.numpy()
    t, s, cols, k = header.padded_tokens, header.padded_seqs, header.block_cols, header.num_samples
    x = buffers
    x.wait_reusable()
    o = 0
    for buf, n in ((x.positions, t), (x.slot_mapping, t), (x.seq_lens, s), (x.query_start_loc, s + 1),
                   (x.logits_indices, k)):
        buf.np[:n] = p[o:o + n]
        o += n
    x.block_tables.np[:s, :cols] = p[o:o + s * cols].reshape(s, cols)
    o += s * cols
    prompt_rows = p[o:o + 2 * header.prompt_slices].reshape(-1, 2).copy()
    dist.broadcast(x.input_ids.dev[:t], 0)
    return header, prompt_rows
