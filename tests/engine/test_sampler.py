"""The sampler on hand-made logits: each parameter does what it says."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from server.engine.params import SamplingParams
from server.engine.sampler import NON_FINITE_LOGITS, SampleRow, greedy_picks, sample

PROBS = torch.tensor([0.55, 0.25, 0.15, 0.05])


def row(
    generator: torch.Generator | None = None, output: list[int] | None = None, **params: object
) -> SampleRow:
    return SampleRow(SamplingParams(**params), [], output or [], generator, ())  # type: ignore[arg-type]


def draw(r: SampleRow, times: int = 400, logits: torch.Tensor | None = None) -> Counter[int]:
    base = PROBS.log() if logits is None else logits
    return Counter(sample(base.repeat(times, 1), [r] * times).token_ids)


def test_greedy_and_temperature_sampling_follow_the_distribution() -> None:
    assert set(draw(row(temperature=0))) == {0}
    counts = draw(row(temperature=1.0), times=4000)
    for token, p in enumerate(PROBS.tolist()):
        assert abs(counts[token] / 4000 - p) < 0.035
    cold = draw(row(temperature=0.2), times=1000)
    assert cold[0] > 950


def test_top_k_top_p_min_p_filter_the_tail() -> None:
    assert set(draw(row(top_k=2))) == {0, 1}
    assert set(draw(row(top_k=1))) == {0}
    assert set(draw(row(top_p=0.7))) == {0, 1}  # 0.55 < 0.7 <= 0.80
    assert set(draw(row(top_p=0.5))) == {0}
    assert set(draw(row(min_p=0.4))) == {0, 1}  # keep p >= 0.4 * 0.55 = 0.22


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.97])
def test_a_wide_nucleus_is_cut_where_a_full_sort_cuts_it(top_p: float) -> None:
    """Nuclei of tens, hundreds and thousands of tokens (past the first 64 and 512 looked at): no
    token outside is ever drawn, and the nucleus' least likely tokens are."""
    vocab = 8192
    shuffle = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))
    logits = torch.linspace(0.0, -6.0, vocab)[shuffle]  # nuclei of 70, 943 and 4,682 tokens
    probs = logits.softmax(-1)
    ordered = probs.sort(descending=True)
    size = int(((ordered.values.cumsum(-1) - ordered.values) < top_p).sum())
    nucleus = set(ordered.indices[:size].tolist())
    tail = set(ordered.indices[int(size * 0.9) : size].tolist())  # its least likely tenth
    drawn: set[int] = set()
    for _ in range(10):
        drawn |= set(sample(logits.repeat(100, 1), [row(top_p=top_p)] * 100).token_ids)
    assert drawn <= nucleus
    assert size < 20 or drawn & tail, size


def test_logit_bias_and_banned_ids() -> None:
    assert set(draw(row(temperature=0, logit_bias={3: 100}))) == {3}
    assert set(draw(row(logit_bias={0: -100, 1: -100}))) <= {2, 3}
    banned = SampleRow(SamplingParams(temperature=0), [], [], None, (0,))
    assert sample(PROBS.log()[None], [banned]).token_ids == [1]


def test_penalties_discourage_seen_tokens() -> None:
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0])
    assert sample(logits[None], [row(temperature=0, output=[0])]).token_ids == [0]
    assert sample(logits[None], [row(temperature=0, output=[0], presence_penalty=0.5)]).token_ids == [1]
    assert sample(logits[None], [row(temperature=0, output=[0], frequency_penalty=0.06)]).token_ids == [0]
    assert sample(logits[None], [row(temperature=0, output=[0, 0], frequency_penalty=0.06)]).token_ids == [1]
    assert sample(logits[None], [row(temperature=0, output=[0], repetition_penalty=1.5)]).token_ids == [1]
    # Repetition penalty multiplies negative logits: a seen negative token gets less likely still.
    neg = torch.tensor([-1.0, -1.2, -5.0, -5.0])
    assert sample(neg[None], [row(temperature=0, output=[0], repetition_penalty=1.5)]).token_ids == [1]


def test_seeded_rows_are_reproducible_and_independent_of_the_batch() -> None:
    def seeded(seed: int) -> SampleRow:
        return row(generator=torch.Generator().manual_seed(seed), temperature=1.0)

    uniform = torch.zeros(50)
    a = [sample(uniform[None], [r]).token_ids[0] for r in [seeded(7)] * 1 for _ in range(1)]
    gen = seeded(7)
    alone = [sample(uniform[None], [gen]).token_ids[0] for _ in range(20)]
    gen2 = seeded(7)
    crowded = [sample(uniform.repeat(3, 1), [row(), gen2, row()]).token_ids[1] for _ in range(20)]
    assert alone == crowded
    assert a[0] == alone[0]
    other = seeded(8)
    assert [sample(uniform[None], [other]).token_ids[0] for _ in range(20)] != alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_picks_take_the_first_maximum_and_flag_every_non_finite_row(dtype: torch.dtype) -> None:
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0],  # a tie: the first
            [-2.0, -1.0, -3.0, -1.0],
            [0.0, -inf, 2.0, 1.0],
            [inf, 0.0, 0.0, 0.0],
            [0.0, nan, 5.0, 0.0],
            [0.0, 0.0, 0.0, 4.0],  # the last id
        ],
        dtype=dtype,
    )
    tokens, finite = greedy_picks(logits).tolist()
    assert [tokens[i] for i in (0, 1, 5)] == [1, 1, 3]
    assert finite == [1, 1, 0, 0, 0, 1]
    plain = [row(temperature=0)] * len(logits)
    errors = [None, None, NON_FINITE_LOGITS, NON_FINITE_LOGITS, NON_FINITE_LOGITS, None]
    for picks in (None, greedy_picks(logits)):  # computed by the sampler, or handed to it
        out = sample(logits.clone(), plain, picks=picks)
        assert out.errors == errors and [out.token_ids[i] for i in (0, 1, 5)] == [1, 1, 3]
    wide = torch.randn(64, 8192, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert greedy_picks(wide)[0].tolist() == wide.float().argmax(dim=-1).tolist()


def test_logprobs_and_non_finite_rows() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 0.0]])
    out = sample(logits, [row(temperature=0, logprobs=2), row(temperature=0)])
    assert out.errors == [None, NON_FINITE_LOGITS]
    chosen, top = out.logprobs[0] or (0.0, [])
    expected = torch.log_softmax(logits[0], -1)
    assert out.token_ids[0] == 2
    assert chosen == pytest.approx(expected[2].item())
    assert [t for t, _ in top] == [2, 1]
    assert top[1][1] == pytest.approx(expected[1].item())
    assert out.logprobs[1] is None


# Finite, in-range values that underflow or overflow float32 somewhere between logits and a draw.
TINY = (1e-45, 1e-300, 5e-324, 1e-8, 9.9e-6)


@pytest.mark.parametrize("temperature", TINY)
def test_a_temperature_that_underflows_is_greedy(temperature: float) -> None:
    assert SamplingParams(temperature=temperature).greedy
    logits = torch.tensor([[0.3, 2.0, 1.9, -4.0]]).repeat(50, 1)
    assert set(sample(logits, [row(temperature=temperature)] * 50).token_ids) == {1}


@pytest.mark.parametrize("top_p", TINY)
def test_a_top_p_that_underflows_keeps_the_most_likely_token(top_p: float) -> None:
    # The most likely token is not id 0: a row whose probabilities were all dropped would draw id 0.
    assert set(draw(row(top_p=top_p), times=200, logits=PROBS.flip(0).log())) == {3}


@pytest.mark.parametrize("penalty", TINY)
def test_a_repetition_penalty_that_overflows_still_draws_from_a_distribution(penalty: float) -> None:
    # Seen tokens with positive logits become +inf: the draw is among them, never NaN-driven.
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]]).repeat(200, 1)
    out = sample(logits, [row(output=[0, 2, 3], repetition_penalty=penalty)] * 200)
    assert set(out.errors) == {None}
    assert set(out.token_ids) <= {0, 3}


def test_huge_logits_with_a_small_temperature_stay_finite() -> None:
    big = torch.tensor([[3e38, 2.9e38, -3e38, 0.0]]).repeat(100, 1)
    out = sample(big, [row(temperature=1e-4)] * 100)
    assert set(out.errors) == {None} and set(out.token_ids) == {0}
