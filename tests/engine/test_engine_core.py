"""The engine against its oracle: the model's own full recompute, no cache, one sequence at a time."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from server.engine.core import LLMEngine
from server.engine.params import ParamError, SamplingParams
from tests.engine.engine_driver import Result, run, submit

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def reference(engine: LLMEngine, prompt: list[int], n: int) -> list[int]:
    out = engine.model.generate(torch.tensor([prompt], device=engine.device), n)
    return out[0, len(prompt) :].tolist()


def random_prompts(count: int, vocab: int, seed: int, max_len: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def test_cached_batched_decode_matches_full_recompute(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(prefill_chunk_tokens=32)
    prompts = random_prompts(24, engine.tokenizer.vocab_size, seed=1)
    results = run(engine, [submit(engine, p, GREEDY) for p in prompts])
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens() == reference(engine, prompt, 12)
        assert result.finish_reason() == "length"


def test_output_alone_equals_output_in_staggered_batch_of_16(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(prefill_chunk_tokens=24)
    prompts = random_prompts(16, engine.tokenizer.vocab_size, seed=2)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = [run(engine, [submit(engine, p, params)])[0].tokens() for p in prompts]
    arrivals = {3 * i: [(p, params)] for i, p in enumerate(prompts)}
    together = run(engine, [], arrivals=arrivals)
    assert [r.tokens() for r in together] == alone
    assert engine.blocks.num_used_blocks == 0


@pytest.mark.parametrize("deterministic", [False, True])
def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(
    make_engine: Callable[..., LLMEngine], deterministic: bool
) -> None:
    engine = make_engine(deterministic=deterministic)
    prompt = engine.tokenizer.encode("def main():\n")
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = run(engine, [submit(engine, prompt, seeded)])[0]
    again = run(engine, [submit(engine, prompt, seeded)])[0]
    noise = SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)
    others = random_prompts(8, engine.tokenizer.vocab_size, seed=3)
    arrivals = {
        0: [(p, noise) for p in others[:4]],
        2: [(prompt, seeded)],
        4: [(p, noise) for p in others[4:]],
    }
    batched = run(engine, [], arrivals=arrivals)
    mine = next(r for r in batched if r.request.params is seeded)
    assert alone.tokens() == again.tokens() == mine.tokens()
    other_seed = run(engine, [submit(engine, prompt, SamplingParams(**{**vars(seeded), "seed": 99}))])[0]
    assert other_seed.tokens() != alone.tokens()


def test_stop_string_across_token_boundary_is_cut_and_not_leaked(
    make_engine: Callable[..., LLMEngine],
) -> None:
    engine = make_engine()
    prompt = engine.tokenizer.encode("import os\n")
    free = run(
        engine, [submit(engine, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))]
    )[0]
    pieces = [engine.tokenizer.decode([t]) for t in free.tokens()]
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1])
    before = "".join(pieces[:k])
    stop = pieces[k][-1:] + pieces[k + 1][:1]
    expected = (before + pieces[k] + pieces[k + 1]).split(stop)[0]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop, "never-happens"])
    stopped = run(engine, [submit(engine, prompt, params)])[0]
    assert stopped.text() == expected
    assert stop not in stopped.text()
    assert stopped.finish_reason() == "stop"
    assert stopped.deltas[-1].stop_reason == stop


def test_stop_token_ids_eos_and_min_tokens(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    prompt = engine.tokenizer.encode("x = 1\n")
    free = run(
        engine, [submit(engine, prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    )[0]
    target = free.tokens()[4]
    stopped = run(
        engine,
        [submit(engine, prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[target]))],
    )[0]
    assert stopped.tokens()[-1] == target
    assert stopped.finish_reason() == "stop" and stopped.deltas[-1].stop_reason == target
    assert len(stopped.tokens()) == free.tokens().index(target) + 1
    # min_tokens bans the stop id until enough tokens exist.
    late = run(
        engine,
        [
            submit(
                engine,
                prompt,
                SamplingParams(max_tokens=10, min_tokens=8, temperature=0, stop_token_ids=[target]),
            )
        ],
    )[0]
    assert target not in late.tokens()[:8]
    # EOS ends generation unless ignore_eos: force EOS with logit_bias.
    eos = engine.tokenizer.eos_token_id
    forced = SamplingParams(max_tokens=10, temperature=0, logit_bias={eos: 100})
    assert run(engine, [submit(engine, prompt, forced)])[0].tokens() == [eos]
    ignored = SamplingParams(max_tokens=5, temperature=0, logit_bias={eos: 100}, ignore_eos=True)
    r = run(engine, [submit(engine, prompt, ignored)])[0]
    assert r.tokens() == [eos] * 5 and r.finish_reason() == "length"


def test_prefix_caching_reuses_shared_prompt_blocks(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    uncached = make_engine(enable_prefix_caching=False)
    system = random_prompts(1, engine.tokenizer.vocab_size, seed=5, max_len=80)[0]
    system = (system * 2)[:80]
    first = system + [7, 8, 9]
    second = system + [10, 11, 12, 13]
    run(engine, [submit(engine, first, GREEDY)])
    hits_before = engine.scheduler.prefix_hit_tokens
    r = run(engine, [submit(engine, second, GREEDY)])[0]
    assert r.finished is not None and r.finished.cached_tokens == 80 // 16 * 16
    assert engine.scheduler.prefix_hit_tokens - hits_before == 80 // 16 * 16
    assert r.tokens() == run(uncached, [submit(uncached, second, GREEDY)])[0].tokens()


def test_n_choices_share_one_prefill(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(enable_prefix_caching=False)
    prompt = random_prompts(1, engine.tokenizer.vocab_size, seed=6, max_len=70)[0] + [5] * 40
    computed: list[int] = []
    execute = engine.runner.execute

    def counting(step, proposals=None):  # type: ignore[no-untyped-def]
        computed.append(sum(step.num_tokens))
        return execute(step, proposals)

    engine.runner.execute = counting  # type: ignore[method-assign]
    params = SamplingParams(n=3, max_tokens=6, temperature=0, ignore_eos=True)
    r = run(engine, [submit(engine, prompt, params)])[0]
    work = sum(computed)
    single = run(
        engine, [submit(engine, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
    )[0]
    assert r.tokens(0) == r.tokens(1) == r.tokens(2) == single.tokens()
    assert r.finished is not None and r.finished.completion_tokens == 18
    # One full prefill; each extra choice recomputes at most its partial last block (16 tokens).
    block = engine.blocks.block_size
    assert work <= len(prompt) + 2 * block + 3 * 6, "choices must share the prompt's blocks"


def test_abort_and_finish_return_cache_to_full_capacity(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    free_at_start = engine.blocks.num_free_blocks
    prompts = random_prompts(6, engine.tokenizer.vocab_size, seed=7)
    results = [submit(engine, p, SamplingParams(max_tokens=50, n=2, ignore_eos=True)) for p in prompts]
    for _ in range(5):
        engine.step()
    assert engine.blocks.num_free_blocks < free_at_start
    for r in results[:3]:
        engine.abort(r.request)
    run(engine, results[3:])
    assert engine.blocks.num_free_blocks == free_at_start
    assert engine.stats().kv_used_tokens == 0 and engine.stats().running == 0


def test_flood_larger_than_cache_completes_uncorrupted(make_engine: Callable[..., LLMEngine]) -> None:
    big = make_engine(max_model_len=256)
    small = make_engine(max_model_len=256, kv_cache_tokens=256, block_size=16, prefill_chunk_tokens=64)
    prompts = random_prompts(20, big.tokenizer.vocab_size, seed=8, max_len=100)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    expected = [r.tokens() for r in run(big, [submit(big, p, params) for p in prompts])]
    flooded = run(small, [submit(small, p, params) for p in prompts])
    assert [r.tokens() for r in flooded] == expected
    assert all(r.error is None and r.finish_reason() == "length" for r in flooded)
    assert small.blocks.num_used_blocks == 0


def test_long_prompt_is_prefilled_in_bounded_chunks_between_decodes(
    make_engine: Callable[..., LLMEngine],
) -> None:
    engine = make_engine(prefill_chunk_tokens=16)
    short = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    steps: list[tuple[int, int]] = []
    schedule = engine.scheduler.schedule

    def recording():  # type: ignore[no-untyped-def]
        step = schedule()
        steps.append((sum(1 for n in step.num_tokens if n == 1), sum(n for n in step.num_tokens if n > 1)))
        return step

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    long_prompt = random_prompts(1, engine.tokenizer.vocab_size, seed=9, max_len=200)[0] * 3
    run(engine, [], arrivals={0: [([5, 6, 7], short), ([8, 9], short)], 4: [(long_prompt[:300], short)]})
    assert max(prefill for _, prefill in steps) <= 16
    during = [d for d, p in steps[5:20] if p]
    assert during and all(d >= 2 for d in during), "running streams keep decoding while the prompt prefills"


def test_logprobs_are_the_models_distribution(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    prompt = engine.tokenizer.encode("class A:\n")
    r = run(
        engine,
        [submit(engine, prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=5, ignore_eos=True))],
    )[0]
    context = list(prompt)
    for delta in r.deltas:
        (entry,) = delta.logprobs or []
        logits = engine.model(torch.tensor([context], device=engine.device))[0, -1].float()
        expected = torch.log_softmax(logits, -1)
        assert entry.logprob == pytest.approx(expected[entry.token_id].item(), abs=1e-4)
        assert [t.token_id for t in entry.top] == expected.topk(5).indices.tolist()
        assert entry.top[0].logprob >= entry.top[-1].logprob
        context.append(entry.token_id)


def test_non_finite_logits_fail_only_that_request(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    prompts = random_prompts(4, engine.tokenizer.vocab_size, seed=10)
    clean = [r.tokens() for r in run(engine, [submit(engine, p, GREEDY) for p in prompts])]
    results = [submit(engine, p, GREEDY) for p in prompts]
    victim = results[1].request
    forward = engine.model.forward

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        logits = forward(*args, **kwargs)
        rows = [
            i
            for i, s in enumerate(engine.scheduler.running)
            if s.request is victim and s.num_output_tokens == 3
        ]
        if rows and logits.shape[0] == len(engine.scheduler.running):
            logits[rows[0]] = float("nan")
        return logits

    engine.model.forward = poisoned  # type: ignore[method-assign]
    run(engine, results)
    assert results[1].error is not None and "non-finite" in str(results[1].error)
    assert [r.tokens() for i, r in enumerate(results) if i != 1] == [c for i, c in enumerate(clean) if i != 1]
    assert engine.blocks.num_used_blocks == 0


def test_context_limits_are_checked_at_submission(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(max_model_len=64)
    with pytest.raises(ParamError) as exc:
        engine.validate([5] * 60, SamplingParams(max_tokens=10))
    assert exc.value.param == "max_tokens"
    with pytest.raises(ParamError) as exc:
        engine.validate([5] * 64, SamplingParams(max_tokens=None))
    assert exc.value.param == "prompt"
    assert engine.validate([5] * 60, SamplingParams(max_tokens=None)) == 4
    with pytest.raises(ParamError, match="outside the vocabulary"):
        engine.validate([10**6], SamplingParams())
    with pytest.raises(ParamError, match="empty"):
        engine.validate([], SamplingParams())


def test_impossible_kv_budget_is_refused(make_engine: Callable[..., LLMEngine]) -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        make_engine(kv_cache_tokens=64)
    with pytest.raises(ValueError, match="GiB"):
        make_engine(kv_cache_tokens=10**12)


def test_results_keep_order_and_usage(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    results: list[Result] = run(
        engine, [submit(engine, [5, 6, 7], SamplingParams(max_tokens=3, n=2, seed=1))]
    )
    (r,) = results
    assert r.finished is not None
    assert r.finished.prompt_tokens == 3 and r.finished.completion_tokens == len(r.tokens(0)) + len(
        r.tokens(1)
    )
    assert r.finished.timings.first_token is not None and r.finished.timings.finished is not None


def test_garbage_in_free_cache_slots_never_reaches_a_sequence(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    prompts = random_prompts(6, engine.tokenizer.vocab_size, seed=11)
    clean = [r.tokens() for r in run(engine, [submit(engine, p, GREEDY) for p in prompts])]
    fresh = make_engine(enable_prefix_caching=False)
    for k, v in fresh.runner.cache:  # every slot but the null block holds NaN, as after a failed forward
        k[fresh.blocks.block_size :] = float("nan")
        v[fresh.blocks.block_size :] = float("nan")
    assert [r.tokens() for r in run(fresh, [submit(fresh, p, GREEDY) for p in prompts])] == clean


def test_bfloat16_engine_serves_prompts_longer_than_one_chunk(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(dtype="bfloat16", prefill_chunk_tokens=16)
    prompt = random_prompts(1, engine.tokenizer.vocab_size, seed=12, max_len=60)[0] * 2
    (r,) = run(engine, [submit(engine, prompt, GREEDY)])
    assert r.error is None and len(r.tokens()) == 12
