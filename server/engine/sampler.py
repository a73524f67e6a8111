"""Logits to token ids, with each row's own parameters, vectorized over the batch.

A random token is drawn by inverse CDF, one uniform number per token: a seeded row draws it from its
own generator, so the same seed gives the same tokens whatever else shares the batch. (The exponential
race drew a number per vocabulary entry: 7 ms a step for 32 rows of 8,192 on the 2-vCPU box.)
Logprobs are the model's own distribution (before penalties, temperature and filters), as OpenAI
reports them.

No finite parameter value can turn a finite row into NaN: each row is shifted so its largest logit is
0 before the temperature divides it (a softmax with a term equal to 1 never sums to 0 or infinity),
and every filter keeps at least the most likely token. A row that is still not a distribution after
all that fails its request with an error instead of drawing garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.params import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    banned_ids: tuple[int, ...]
    """Token ids that may not be sampled now (EOS and stop ids before min_tokens)."""

    @property
    def plain_greedy(self) -> bool:
        """Its token is the argmax of its raw logits: greedy, nothing that changes or reports them."""
        p = self.params
        return (
            p.greedy
            and p.logprobs is None
            and not (p.logit_bias or self.banned_ids or p.presence_penalty or p.frequency_penalty)
            and p.repetition_penalty == 1.0
        )


NON_FINITE_LOGITS = "the model produced non-finite logits"
NO_DISTRIBUTION = "sampling produced no valid probability distribution"


@dataclass
class SampleResult:
    token_ids: list[int]
    errors: list[str | None]
    """Why a row has no usable token (its logits held NaN or Inf, or sampling failed): that request
    fails, the others go on."""
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]
    """Per row: (logprob of the sampled token, [(token id, logprob)] of the top alternatives)."""


def greedy_picks(logits: Tensor) -> Tensor:
    """[2, rows] of int64: each row's most likely token (the first, if tied), and 1 where all its
    logits are finite (its token is meaningless otherwise).

    The compiled decode step computes these with its logits: eager reductions over a batch of rows
    cost more here than the model's last layer (the old sampler took 2.8 ms for 32 rows of 8,192
    bfloat16 logits on the 2-vCPU box). Written as max, min and the first index holding the max:
    inductor vectorizes those, not argmax (at 32 rows, about 180 against 360 us in the graph).
    """
    top, bottom = logits.amax(dim=-1), logits.amin(dim=-1)  # both NaN if the row holds a NaN
    index = torch.arange(logits.shape[-1], device=logits.device)
    first = torch.where(logits == top[:, None], index, logits.shape[-1] - 1).amin(dim=-1)
    return torch.stack([first, (top.isfinite() & bottom.isfinite()).long()])


def _apply_penalties(logits: Tensor, rows: list[SampleRow], idx: list[int]) -> None:
    vocab = logits.shape[-1]
    device = logits.device
    for i in idx:
        p = rows[i].params
        row = logits[i]
        out = torch.tensor(rows[i].output_ids, dtype=torch.long, device=device)
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor(rows[i].prompt_ids, dtype=torch.long, device=device)] = True
            seen[out] = True
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalized, row))
        if (p.presence_penalty or p.frequency_penalty) and len(out):
            counts = torch.zeros(vocab, dtype=logits.dtype, device=device).index_add_(
                0, out, torch.ones(len(out), dtype=logits.dtype, device=device)
            )
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


@torch.inference_mode()
def sample(
    logits: Tensor,
    rows: list[SampleRow],
    masked_rows: list[int] | None = None,
    allowed: Tensor | None = None,
    picks: Tensor | None = None,
) -> SampleResult:
    """Sample one token per row. `logits` may be modified in place.

    `allowed` ([len(masked_rows), vocab], boolean) restricts rows `masked_rows` to those tokens (a
    grammar's mask): disallowed logits become -inf first, so every other parameter (penalties,
    temperature, top-k/p, min-p) applies within the allowed set. No row masked, no cost.
    `picks` are `greedy_picks(logits)` when the forward computed them already.
    """
    n = len(rows)
    if not masked_rows and all(r.plain_greedy for r in rows):
        tokens_and_finite = (picks if picks is not None else greedy_picks(logits)).tolist()
        errors = [None if ok else NON_FINITE_LOGITS for ok in tokens_and_finite[1]]
        return SampleResult(token_ids=tokens_and_finite[0], errors=errors, logprobs=[None] * n)
    # Rows holding NaN/Inf are flagged; their tokens are computed like the others, then discarded.
    finite = picks[1].bool() if picks is not None else logits.isfinite().all(dim=-1)
    logits = logits.float()
    device = logits.device

    want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None
    if masked_rows and allowed is not None:
        idx = torch.tensor(masked_rows, dtype=torch.long, device=device)
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))

    penalized = [
        i
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
    ]
    if penalized:
        logits = logits.clone()
        _apply_penalties(logits, rows, penalized)
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            ids = torch.tensor(list(r.params.logit_bias), dtype=torch.long, device=device)
            vals = torch.tensor(list(r.params.logit_bias.values()), dtype=logits.dtype, device=device)
            logits[i].index_add_(0, ids, vals)
        if r.banned_ids:
            logits[i, list(r.banned_ids)] = float("-inf")

    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if len(sampled) == n:
        tokens, valid = _sample_rows(logits, rows)
    else:
        tokens, valid = logits.max(dim=-1).indices, torch.ones_like(finite)
        if sampled:
            tokens[sampled], valid[sampled] = _sample_rows(logits[sampled], [rows[i] for i in sampled])

    top_k = max((rows[i].params.logprobs or 0 for i in want_logprobs), default=0)
    packed = torch.cat([tokens, finite.long(), valid.long()])
    if raw_logprobs is not None:
        chosen = raw_logprobs.gather(1, tokens[want_logprobs, None]).squeeze(1)
        top = raw_logprobs.topk(top_k, dim=-1) if top_k else None
        values = [chosen] + ([top.values.flatten()] if top is not None else [])
        lp_flat = torch.cat(values).tolist()
        top_ids = top.indices.tolist() if top is not None else None
    flat = packed.tolist()

    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * n
    if raw_logprobs is not None:
        m = len(want_logprobs)
        for j, i in enumerate(want_logprobs):
            k = rows[i].params.logprobs or 0
            alts = []
            if top_ids is not None:
                vals = lp_flat[m + j * top_k : m + j * top_k + k]
                alts = list(zip(top_ids[j][:k], vals, strict=True))
            logprobs[i] = (lp_flat[j], alts)
    errors = [
        NON_FINITE_LOGITS if not ok_logits else None if ok_probs else NO_DISTRIBUTION
        for ok_logits, ok_probs in zip(flat[n : 2 * n], flat[2 * n :], strict=True)
    ]
    return SampleResult(token_ids=flat[:n], errors=errors, logprobs=logprobs)


def _sample_rows(logits: Tensor, rows: list[SampleRow]) -> tuple[Tensor, Tensor]:
    """Draw one token per row; also whether each row's final probabilities were a distribution."""
    device = logits.device
    vocab = logits.shape[-1]
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=device)
    # Unnormalized probabilities, exp(logit / temperature) with each row shifted so that its largest
    # weight is exactly 1 (a penalty may have pushed a logit to +inf: clamp first).
    logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    weights = ((logits - logits.amax(dim=-1, keepdim=True)) / temps[:, None]).exp_()
    with_k = [j for j, r in enumerate(rows) if 0 < r.params.top_k < vocab]
    if with_k:  # the k-th largest weight of each such row bounds what it keeps (ties at it stay)
        ks = torch.tensor([rows[j].params.top_k for j in with_k], device=device)
        kth = weights[with_k].topk(int(ks.max())).values.gather(1, (ks - 1)[:, None])
        weights[with_k] = weights[with_k].masked_fill(weights[with_k] < kth, 0.0)
    if any(r.params.top_p < 1.0 for r in rows):
        top_p = torch.tensor([r.params.top_p for r in rows], dtype=weights.dtype, device=device)
        floor = _nucleus_floor(weights, top_p * weights.sum(dim=-1))
        weights = weights.masked_fill(weights < floor, 0.0)
    if any(r.params.min_p > 0 for r in rows):  # relative to the most likely token's weight, 1
        min_p = torch.tensor([r.params.min_p for r in rows], dtype=weights.dtype, device=device)
        weights = weights.masked_fill(weights < min_p[:, None], 0.0)
    # Inverse CDF: the first token whose cumulative weight passes u * total, u uniform in [0, 1). The
    # target stays below the total, so a token of weight 0 (cdf flat across it) is never chosen.
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1]
    target = torch.minimum(_uniforms(rows, device) * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp(max=vocab - 1)
    return tokens, total.isfinite() & (total > 0)


def _nucleus_floor(weights: Tensor, mass: Tensor) -> Tensor:
    """[rows, 1]: the weight of the least likely token in each row's nucleus (its most likely tokens
    whose weight first reaches `mass`: top_p of the total; a token tied with that one stays in too).

    Looks among each row's 64 most likely tokens first, then 8 times more, before sorting a whole
    row: a full sort of 32 rows of 8,192 took 10 ms on the 2-vCPU box, the first `topk` 0.4 ms.
    """
    vocab = weights.shape[-1]
    k = min(64, vocab)
    while True:
        top = weights.topk(k).values  # most likely first
        # Kept: the tokens whose more likely ones weigh less than `mass`; never fewer than one (a top_p
        # that rounds to 0 in float32 would keep none).
        kept = ((top.cumsum(dim=-1) - top) < mass[:, None]).sum(dim=-1).clamp(min=1)
        if k == vocab or bool((kept < k).all()):  # every nucleus ends within these k
            return top.gather(1, (kept - 1)[:, None])
        k = min(8 * k, vocab)


def _uniforms(rows: list[SampleRow], device: torch.device) -> Tensor:
    """One uniform draw per row: a seeded row's from its own generator (see `skip_draws`)."""
    u = torch.empty(len(rows), device=device)
    unseeded = [j for j, r in enumerate(rows) if r.generator is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), device=device)
    for j, r in enumerate(rows):  # in row order: a sequence's verify rows share its generator
        if r.generator is not None:
            u[j] = _seeded_draw(r.generator)
    return u


def _seeded_draw(generator: torch.Generator) -> Tensor:
    return torch.rand(1, generator=generator, device=generator.device)


def skip_draws(generator: torch.Generator, tokens: int) -> None:
    """Advance a seeded row's generator past the draws of `tokens` sampled tokens, as the sampler makes
    them (speculative decoding rewinds it to where its emitted tokens' draws end)."""
    for _ in range(tokens):
        _seeded_draw(generator)


@torch.inference_mode()
def score(
    logits: Tensor, targets: list[int], k: int
) -> tuple[list[float], list[int], list[list[tuple[int, float]]]] | None:
    """Prompt scoring: row j's log-probability of `targets[j]`, its rank (1: the most likely) and the
    `k` most likely tokens with theirs. None if the logits are not all finite."""
    logits = logits.float()
    if not bool(logits.isfinite().all()):
        return None
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top = logprobs.topk(k, dim=-1) if k else None
    alternatives = (
        [list(zip(i, v, strict=True)) for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
        if top is not None
        else [[] for _ in targets]
    )
    return chosen.squeeze(1).tolist(), ranks.tolist(), alternatives
