"""Sampler: greedy, truncation, distribution, seeds, min_tokens, penalties and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from protocol.sampling import SamplingParams
from worker.engine.sampler import Sampler, SamplingBatch, apply_penalties, fold_seed, make_generator

VOCAB = 1000


def make_batch(
    params: list[SamplingParams],
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    stop_ids_until_min: list[set[int]] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=params,
        output_token_ids=outputs or [[] for _ in range(n)],
        prompt_token_ids=prompts or [[] for _ in range(n)],
        generators=generators or [None] * n,
        stop_ids_until_min=stop_ids_until_min or [set() for _ in range(n)],
    )


def seeded(params: list[SamplingParams]) -> list[torch.Generator | None]:
    return [make_generator(p.seed, "cpu") if p.seed is not None else None for p in params]


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_equals_argmax(logits):
    params = [SamplingParams(temperature=0.0)] * len(logits)
    before = logits.clone()
    out = Sampler()(logits, make_batch(params))
    assert out.token_ids == logits.argmax(dim=1).tolist()
    assert out.logprobs == [None] * len(logits)
    assert torch.equal(logits, before)


def test_greedy_rows_in_a_mixed_batch_equal_argmax(logits):
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9)] * 4
    params[2] = SamplingParams(temperature=0.0, logprobs=2)
    before = logits.clone()
    out = Sampler()(logits, make_batch(params))
    expected = logits.argmax(dim=1).tolist()
    assert [out.token_ids[i] for i in range(0, 8, 2)] == [expected[i] for i in range(0, 8, 2)]
    assert torch.equal(logits, before)  # the sampler works on a copy


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=1.0),
        SamplingParams(temperature=1e-6),  # below the greedy threshold
    ],
    ids=["top_k=1", "tiny top_p", "min_p=1", "tiny temperature"],
)
def test_truncation_to_one_token_is_argmax(logits, params):
    for _ in range(5):
        out = Sampler()(logits, make_batch([params] * len(logits)))
        assert out.token_ids == logits.argmax(dim=1).tolist()


# Four tokens with probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def draw(params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    logits = PROBS.log().repeat(n, 1)
    return torch.tensor(Sampler()(logits, make_batch([params] * n)).token_ids)


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_p=0.7), {0, 1}),  # 0.5 < 0.7, then 0.8 >= 0.7: two tokens
        (SamplingParams(top_p=0.85), {0, 1, 2}),
        (SamplingParams(min_p=0.5), {0, 1}),  # keep p >= 0.25
        (SamplingParams(min_p=0.2), {0, 1, 2}),  # keep p >= 0.1
        (SamplingParams(top_k=3, min_p=0.5), {0, 1}),
        # min_p first, as vLLM v1: {0, 1} (p >= 0.25), renormalized 0.625 / 0.375, then top_p 0.6 keeps one.
        # top_p first would keep {0, 1} (0.5 < 0.6), which min_p 0.5 then keeps too.
        (SamplingParams(top_p=0.6, min_p=0.5), {0}),
    ],
)
def test_top_k_top_p_min_p_keep_exactly_the_allowed_tokens(params, allowed):
    assert set(draw(params).tolist()) == allowed


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_temperature_sampling_follows_softmax(temperature):
    tokens = draw(SamplingParams(temperature=temperature), n=40000)
    probs = torch.softmax(PROBS.log() / temperature, dim=0)
    # 3 degrees of freedom: P(chi2 > 20) < 2e-4. A fixed seed keeps the test deterministic.
    assert chi_square(tokens, probs) < 20


def test_top_p_renormalizes_over_the_kept_tokens():
    tokens = draw(SamplingParams(top_p=0.85), n=40000)
    assert chi_square(tokens, torch.tensor([0.5, 0.3, 0.15, 0.0]).add(1e-12) / 0.95) < 20


def test_seeds_that_share_their_low_32_bits_draw_different_samples():
    """The CPU's generator keeps 32 bits of a seed; the API takes 64 (negative ones too)."""
    def draws(seed: int) -> list[float]:
        return torch.rand(8, generator=make_generator(seed, "cpu")).tolist()

    for a, b in ((3, 3 + 2**32), (-1, 2**63 - 1), (1, -(2**63) + 1), (12345, 12345 - 2**32)):
        assert draws(a) != draws(b), (a, b)
        assert draws(a) == draws(a)
    assert len({fold_seed(s) for s in range(-5000, 5000)}) == 10000  # small seeds stay apart
    assert all(0 <= fold_seed(s) < 2**32 for s in (-(2**63), -1, 0, 2**63 - 1, 2**64 - 1))


def test_seeded_rows_are_reproducible_whatever_the_batch(logits):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def stream(neighbours: int, steps: int = 20) -> list[int]:
        """The seeded row's tokens over several steps, placed last behind other requests."""
        gen = make_generator(1234, "cpu")
        others = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0)] * neighbours
        tokens = []
        for step in range(steps):
            torch.manual_seed(step + 100 * neighbours)  # the unseeded rows differ from run to run
            batch = make_batch([*others, params], generators=[None] * len(others) + [gen])
            rows = torch.cat([torch.randn(len(others), VOCAB), logits[step % 8 : step % 8 + 1]])
            tokens.append(Sampler()(rows, batch).token_ids[-1])
        return tokens

    alone = stream(0)
    assert stream(0) == alone
    assert stream(1) == alone
    assert stream(5) == alone
    assert len(set(alone)) > 1  # it does sample, not argmax


def test_different_seeds_differ():
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(64)]
    logits = torch.zeros(64, VOCAB)
    tokens = Sampler()(logits, make_batch(params, generators=seeded(params))).token_ids
    assert len(set(tokens)) > 50


def test_min_tokens_blocks_eos_until_reached():
    eos, stop_id = 7, 9
    logits = torch.zeros(2, 16)
    logits[:, eos] = 100.0
    logits[:, stop_id] = 50.0
    params = [SamplingParams(temperature=0.0, min_tokens=3), SamplingParams(temperature=1.0, min_tokens=3)]
    blocked = make_batch(params, stop_ids_until_min=[{eos, stop_id}, {eos, stop_id}])
    for _ in range(20):
        assert not {eos, stop_id} & set(Sampler()(logits, blocked).token_ids)
    reached = make_batch(params)  # min_tokens reached: the runner passes empty sets
    assert Sampler()(logits, reached).token_ids == [eos, eos]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0, -1.0]])
    batch = make_batch([SamplingParams(repetition_penalty=2.0)], outputs=[[1]], prompts=[[0, 0]])
    apply_penalties(logits, batch, [0])
    assert logits.tolist() == [[1.0, -4.0, 1.0, 3.0, -1.0]]  # seen in prompt (0) and output (1) only


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 5)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    batch = make_batch([params], outputs=[[2, 2, 3, 2]], prompts=[[0, 1]])
    apply_penalties(logits, batch, [0])
    assert logits.tolist() == [[0.0, 0.0, -(0.5 * 3 + 0.25), -(0.5 + 0.25), 0.0]]


def test_penalties_apply_per_row_and_steer_greedy():
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5),  # 5 / 1.5 < 4
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5),  # 5 - 0.5 - 1 < 4
    ]
    batch = make_batch(params, outputs=[[0], [0], [0]])
    assert Sampler()(logits, batch).token_ids == [1, 0, 1]


def test_logit_bias_steers_greedy_and_sampled_rows_and_leaves_others(logits):
    target = int(logits[0].argmin())
    params = [SamplingParams(temperature=0.0, logit_bias={target: 100.0}),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=3, logit_bias={target: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={int(logits[3].argmax()): -100.0}),
              SamplingParams(temperature=0.0, logprobs=0, logit_bias={target: 100.0})]
    sub = logits[:5].clone()
    spread = float(sub.max() - sub.min())
    assert spread < 100  # the bias outweighs any gap between these logits
    out = Sampler()(sub, make_batch(params, generators=seeded(params)))
    assert out.token_ids[0] == target and out.token_ids[2] == target and out.token_ids[4] == target
    assert out.token_ids[1] == int(logits[1].argmax())  # the row without bias is untouched
    assert out.token_ids[3] == int(logits[3].topk(2).indices[1])  # the best token pushed down
    # Logprobs stay the model's, before the bias.
    assert out.logprobs[4].logprob == pytest.approx(float(torch.log_softmax(logits[4], 0)[target]), abs=1e-5)
    assert torch.equal(sub, logits[:5])  # the runner's logits are untouched


def test_a_batch_without_bias_takes_the_plain_argmax_path(logits, monkeypatch):
    from worker.engine import sampler

    def boom(*_):
        raise AssertionError("apply_logit_bias called without any bias")

    monkeypatch.setattr(sampler, "apply_logit_bias", boom)
    params = [SamplingParams(temperature=0.0)] * len(logits)
    assert Sampler()(logits, make_batch(params)).token_ids == logits.argmax(dim=1).tolist()


def test_logprobs_are_raw_log_softmax_with_sorted_top_n(logits):
    params = [
        SamplingParams(temperature=1.0, logprobs=5),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=50, logprobs=3, repetition_penalty=1.3),
    ]
    rows = logits[:4]
    out = Sampler()(rows, make_batch(params, outputs=[[1, 2]] * 4, prompts=[[3]] * 4))
    expected = torch.log_softmax(rows, dim=1)  # before penalties and temperature, as vLLM's raw_logprobs
    for i, lp in enumerate(out.logprobs):
        if params[i].logprobs is None:
            assert lp is None
            continue
        assert lp.token_id == out.token_ids[i]
        assert math.isclose(lp.logprob, float(expected[i, lp.token_id]), abs_tol=1e-5)
        assert len(lp.top) == params[i].logprobs
        values, ids = expected[i].topk(params[i].logprobs)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert all(math.isclose(v, float(expected[i, t]), abs_tol=1e-5) for t, v in lp.top)
    assert out.logprobs[1].top == []
    assert out.logprobs[1].token_id == int(rows[1].argmax())


def test_bf16_logits_sample_as_their_float32_copy(logits):
    """The model hands the sampler logits in its own dtype: greedy rows take the argmax as they are (ties
    in bf16 go to the first index, as in the float32 copy), and every other path widens first."""
    half = logits.to(torch.bfloat16)
    half[0, 7] = half[0, 3] = half[0].max() + 1  # a tie only bf16 rounding makes
    wide = half.float()
    greedy = [SamplingParams(temperature=0.0)] * len(half)
    assert Sampler()(half, make_batch(greedy)).token_ids == wide.argmax(dim=1).tolist()
    assert Sampler()(half, make_batch(greedy)).token_ids[0] == 3
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(seed=5, temperature=0.8)] * 4
    a = Sampler()(half, make_batch(params, generators=seeded(params)))
    b = Sampler()(wide, make_batch(params, generators=seeded(params)))
    assert a.token_ids == b.token_ids
    assert [lp.logprob for lp in a.logprobs[::2]] == [lp.logprob for lp in b.logprobs[::2]]
