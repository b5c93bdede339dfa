"""Two ranks on the CPU (gloo) against one: each parallel layer and the whole model give the one-rank
output, from the same whole weights cut by the layers' weight loaders. Heads that do not split evenly
(smollm2's 9 query and 3 KV heads over 2 ranks) and KV heads replicated over more ranks than there are
included."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as tmp  # noqa: E402

from tests.conftest import free_port  # noqa: E402
from tokenq_kernels.attention_metadata import AttentionMetadata  # noqa: E402
from worker.engine import distributed  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.distributed import head_shard  # noqa: E402

WORLD = 2


def test_head_shards_cover_every_head_once():
    for heads, kv, size in [(32, 8, 8), (32, 8, 2), (9, 3, 2), (9, 3, 3), (4, 2, 4), (8, 1, 2)]:
        shards = [head_shard(heads, kv, size, r) for r in range(size)]
        q = sorted(i for s in shards for i in range(s.q_start, s.q_start + s.num_heads))
        assert q == list(range(heads)), (heads, kv, size)
        group = heads // kv
        for s in shards:  # each rank's query heads read only the KV heads it holds
            assert s.kv_start <= s.q_start // group and (s.q_start + s.num_heads - 1) // group < s.kv_start + s.num_kv_heads
    with pytest.raises(ValueError):
        head_shard(9, 3, 4, 0)


def _layers_and_inputs():
    """Every parallel layer with whole weights, and an input for each (seeded: the same in every process)."""
    from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from worker.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    x = rand(5, 24)
    cases = {
        "column": (lambda: ColumnParallelLinear(24, 16, bias=True), [("weight", rand(16, 24), None),
                                                                     ("bias", rand(16), None)], x),
        "merged": (lambda: MergedColumnParallelLinear(24, [8, 8]), [("weight", rand(8, 24), 0),
                                                                   ("weight", rand(8, 24), 1)], x),
        "qkv": (lambda: QKVParallelLinear(24, 4, 6, 3), [("weight", rand(24, 24), "q"), ("weight", rand(12, 24), "k"),
                                                         ("weight", rand(12, 24), "v")], x),
        "row": (lambda: RowParallelLinear(24, 10, bias=True), [("weight", rand(10, 24), None),
                                                               ("bias", rand(10), None)], x),
        "embedding": (lambda: VocabParallelEmbedding(11, 6), [("weight", rand(11, 6), None)],
                      torch.tensor([0, 3, 5, 6, 10, 2])),
        "lm_head": (lambda: ParallelLMHead(11, 6), [("weight", rand(11, 6), None)], rand(3, 6)),
    }
    return cases


def _run_layers() -> dict[str, torch.Tensor]:
    out = {}
    for name, (make, weights, x) in _layers_and_inputs().items():
        layer = make()
        for pname, w, shard_id in weights:
            p = getattr(layer, pname)
            p.weight_loader(p, w, shard_id)
        if name == "row":  # its input is the column-parallel output this rank holds
            x = x.narrow(-1, layer.input_start, layer.weight.shape[1])
        y = layer(x)
        if name in ("column", "merged", "qkv"):  # outputs stay sharded: gather them to compare
            y = _whole(layer, name, _gather_uneven(y))
        out[name] = y
    return out


def _gather_uneven(y: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(rank, its output) for every rank; outputs may differ in width."""
    import torch.distributed as dist

    if distributed.tp_size() == 1:
        return [(0, y)]
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(WORLD)]
    dist.all_gather(sizes, torch.tensor([y.shape[-1]]))
    width = int(max(sizes))
    parts = [torch.zeros(y.shape[0], width) for _ in sizes]
    dist.all_gather(parts, torch.nn.functional.pad(y, (0, width - y.shape[-1])).contiguous())
    return [(r, part[:, : int(n)]) for r, (part, n) in enumerate(zip(parts, sizes, strict=True))]


def _whole(layer, name: str, parts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The one-rank layout of sharded outputs: each rank's [q, k, v] (or [gate, up]) regrouped."""
    if name == "column":
        return torch.cat([p for _, p in parts], dim=-1)
    pieces: list[list[torch.Tensor]] = [[], [], []]
    for r, p in parts:
        if name == "qkv":
            sh = head_shard(6, 3, len(parts), r)
            d = layer.head_size
            split = [sh.num_heads * d, sh.num_kv_heads * d, sh.num_kv_heads * d]
        else:
            split = [s // len(parts) for s in layer.output_sizes]
        for i, piece in enumerate(p.split(split, dim=-1)):
            pieces[i].append(piece)
    return torch.cat([torch.cat(group, dim=-1) for group in pieces if group], dim=-1)


def _run_model(path: str) -> torch.Tensor:
    """Logits of a two-sequence prefill step of the model in `path`."""
    from worker.models.loader import load_model

    model, cfg = load_model(path)
    shard = head_shard(cfg.num_attention_heads, cfg.num_key_value_heads, distributed.tp_size(), distributed.tp_rank())
    kv = torch.zeros(cfg.num_hidden_layers, 2, 8, 16, shard.num_kv_heads, cfg.head_dim)
    model.bind_kv_cache(kv)
    ids = torch.tensor([3, 9, 27, 81, 5, 7, 11])
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    meta = AttentionMetadata(slot_mapping=torch.tensor([0, 1, 2, 3, 16, 17, 18]),
                             query_start_loc=torch.tensor([0, 4, 7], dtype=torch.int32),
                             seq_lens=torch.tensor([4, 3], dtype=torch.int32),
                             block_tables=torch.tensor([[0], [1]], dtype=torch.int32), max_query_len=4,
                             max_seq_len=4, num_decodes=0, query_start_loc_cpu=[0, 4, 7], seq_lens_cpu=[4, 3])
    from worker.layers.context import set_attention_metadata

    with torch.inference_mode(), set_attention_metadata(meta):
        hidden = model(ids, pos)
        return model.compute_logits(hidden)


def _rank(rank: int, port: int, model_path: str, results) -> None:
    distributed.init_tensor_parallel(rank, WORLD, port, torch.device("cpu"))
    try:
        out = _run_layers()
        out["model"] = _run_model(model_path)
        if rank == 0:
            # numpy, not tensors: a tensor in a queue is shared through this process, which exits now
            results.put({k: v.detach().numpy().copy() for k, v in out.items()})
    finally:
        distributed.destroy_tensor_parallel()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What every layer and the model give on one rank (here) and on rank 0 of two (spawned)."""
    import contextlib
    import json
    import queue
    import shutil

    from safetensors.torch import save_file

    from worker.models.random_weights import hf_state_dict, random_model, shape_config  # noqa: I001

    # A smollm2-like head layout (3 query heads per KV head, 3 KV heads) that 2 ranks split unevenly.
    config = shape_config("tiny", num_attention_heads=6, num_key_value_heads=3, hidden_size=48,
                          tie_word_embeddings=True, vocab_size=500)
    model, _ = random_model(config, torch.float32, "cpu", seed=3)
    path = tmp_path_factory.mktemp("tp-model")
    save_file({k: v.contiguous() for k, v in hf_state_dict(model).items() if k != "lm_head.weight"},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    one = _run_layers()
    one["model"] = _run_model(str(path))
    ctx = tmp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(path), results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    two = None
    while two is None and any(p.is_alive() for p in procs):
        try:
            two = results.get(timeout=2)
        except queue.Empty:
            pass
    if two is None:  # rank 0 may have put its results and exited between two polls
        with contextlib.suppress(queue.Empty):
            two = results.get(timeout=5)
    assert two is not None, "a rank failed (its traceback is above)"
    for p in procs:
        p.join(60)
    shutil.rmtree(path, ignore_errors=True)
    return one, two


@pytest.mark.parametrize("name", ["column", "merged", "qkv", "row", "embedding", "lm_head", "model"])
def test_two_ranks_equal_one(two_ranks, name):
    one, two = two_ranks
    got = torch.from_numpy(two[name])
    assert one[name].shape == got.shape
    torch.testing.assert_close(got, one[name].detach(), rtol=1e-4, atol=1e-4)


def test_ranks_on_a_cpu_share_its_cores(monkeypatch):
    from worker.engine.config import EngineConfig
    from worker.engine.cpu_rank import share_cores

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(16)
        monkeypatch.setattr("os.cpu_count", lambda: 17)
        share_cores(EngineConfig(tensor_parallel_size=1))  # one rank keeps what it has
        assert torch.get_num_threads() == 16
        share_cores(EngineConfig(tensor_parallel_size=2))  # one core left over, the rest halved
        assert torch.get_num_threads() == 8
        monkeypatch.setattr("os.cpu_count", lambda: 2)
        share_cores(EngineConfig(tensor_parallel_size=2))  # never below one thread
        assert torch.get_num_threads() == 1
        share_cores(EngineConfig(tensor_parallel_size=2, cpu_threads=3))  # the option wins, for each rank
        assert torch.get_num_threads() == 3
        share_cores(EngineConfig(device="cuda", cpu_threads=2))  # a GPU rank leaves its threads alone
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


class OtherRankOnCuda(EngineConfig):
    """Rank 0 on the CPU, rank 1 on a GPU (at module level: the config is pickled to the spawned rank)."""

    def rank_device(self, rank: int) -> str:
        return "cpu" if rank == 0 else "cuda:1"


def _start_group(path: str, results) -> None:
    from worker.engine import tp_ranks

    try:
        tp_ranks.TensorParallelGroup(path, OtherRankOnCuda(tensor_parallel_size=2))
        results.put("joined")
    except RuntimeError as e:
        results.put(str(e))


def test_a_rank_that_fails_before_joining_is_an_error_not_a_hang(tmp_path):
    import queue

    if torch.cuda.is_available():
        pytest.skip("needs a machine where the other rank's CUDA device cannot be set")
    # Rank 0 runs in a child of its own: a rendezvous that hangs cannot be interrupted in this process.
    ctx = tmp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_start_group, args=(str(tmp_path), results))
    proc.start()
    try:
        # Rank 1 fails on torch.cuda.set_device(cuda:1), before the rendezvous that rank 0 would wait in.
        message = results.get(timeout=90)
    except queue.Empty:
        pytest.fail("rank 0 still waits for a rank that failed before joining")
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert re.search("tokenq-tp-rank1 exited .* before joining", message), message
