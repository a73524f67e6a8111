"""Speculative decoding (ngram): exactly the tokens, distribution and cache of decoding one at a time."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch

from model.checkpoint import load_model, save_model
from server.engine.config import EngineConfig
from server.engine.core import LLMEngine
from server.engine.params import SamplingParams
from server.engine.speculative import REST_STEPS, WINDOW, NgramIndex
from server.engine.structured import Constraint
from tests.conftest import make_tiny_checkpoint
from tests.engine.engine_driver import Result, run, submit

SPEC = {"speculative_method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def ngram_proposal(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """A fresh index's proposal for the whole of `tokens`."""
    return NgramIndex(n_min, n_max).propose(tokens, k)


def scanned_proposal(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The proposal by its definition: scan for the longest suffix's latest earlier occurrence."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[len(tokens) - n :]
        ends = [e for e in range(n - 1, len(tokens) - 1) if tokens[e - n + 1 : e + 1] == suffix]
        if ends:
            follow = tokens[ends[-1] + 1 :]
            return [follow[i % len(follow)] for i in range(k)]
    return []


def test_ngram_proposal_takes_the_longest_suffix_and_its_latest_earlier_occurrence() -> None:
    # "2 3" occurs twice before the end; its latest occurrence is followed by 9.
    assert ngram_proposal([1, 2, 3, 7, 5, 2, 3, 9, 8, 2, 3], 2, 1, 2) == [9, 8]
    # The 3-gram "5 2 3" beats the latest 2-gram match.
    assert ngram_proposal([5, 2, 3, 4, 4, 1, 2, 3, 9, 5, 2, 3], 2, 1, 3) == [4, 4]
    # Too short a match finds nothing; a match at the end repeats with its period.
    assert ngram_proposal([1, 2, 3, 4], 3, 1, 3) == []
    assert ngram_proposal([7, 1, 2, 1, 2], 5, 2, 2) == [1, 2, 1, 2, 1]
    assert ngram_proposal([4, 4, 4], 3, 1, 1) == [4, 4, 4]
    assert ngram_proposal([1, 2, 9, 2], 3, 2, 2) == []  # only 1-grams match, below the minimum


@pytest.mark.parametrize("seed", range(4))
def test_an_ngram_index_grown_token_by_token_proposes_what_a_scan_finds(seed: int) -> None:
    """The index is kept as a sequence grows (by one token, or several after an accepted draft), and
    each of its proposals equals a scan of the whole sequence."""
    rng = random.Random(seed)
    n_min = rng.randint(1, 3)
    n_max = n_min + rng.randint(0, 3)
    index = NgramIndex(n_min, n_max)
    tokens = [rng.randrange(6) for _ in range(rng.randint(0, 20))]  # a small vocabulary: many matches
    for _ in range(150):
        k = rng.randint(1, 6)
        assert index.propose(tokens, k) == scanned_proposal(tokens, k, n_min, n_max), (tokens, k)
        tokens += [rng.randrange(6) for _ in range(rng.choice([1, 1, 1, 2, 4]))]


def prompts(engine: LLMEngine, count: int, seed: int) -> list[list[int]]:
    """Random prompts, half of them repetitive (so proposals are made and accepted), of varied length."""
    rng = random.Random(seed)
    vocab = engine.tokenizer.vocab_size
    out = []
    for i in range(count):
        piece = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 8))]
        out.append(piece * rng.randint(2, 6) if i % 2 == 0 else [rng.randrange(3, vocab) for _ in range(20)])
    return out


def generations(
    engine: LLMEngine, batch: list[tuple[list[int], SamplingParams]], stagger: int = 3
) -> list[Result]:
    """All of `batch`, arriving a few steps apart, so batches grow, shrink and mix."""
    arrivals: dict[int, list[tuple[list[int], SamplingParams]]] = {}
    for i, item in enumerate(batch):
        arrivals.setdefault(i * stagger, []).append(item)
    return run(engine, [], arrivals=arrivals)


def outputs(results: list[Result]) -> list[tuple[list[int], str, str | None, list[float]]]:
    out = []
    for r in results:
        assert r.error is None and r.finished is not None
        for i in range(r.request.params.n):
            deltas = [d for d in r.deltas if d.index == i]
            lps = [lp.logprob for d in deltas for lp in d.logprobs or []]
            out.append((r.tokens(i), r.text(i), r.finish_reason(i), lps))
    return out


def spied(engine: LLMEngine) -> list[list[list[int]]]:
    """Record the proposals of each speculating step (the real proposer runs)."""
    seen: list[list[list[int]]] = []
    assert engine.speculator is not None
    propose = engine.speculator.propose

    def record(step):  # type: ignore[no-untyped-def]
        proposals = propose(step)
        if proposals is not None:
            seen.append(proposals)
        return proposals

    engine.speculator.propose = record  # type: ignore[method-assign]
    return seen


def assert_same(a: list[Result], b: list[Result]) -> None:
    for (ta, xa, fa, la), (tb, xb, fb, lb) in zip(outputs(a), outputs(b), strict=True):
        assert (ta, xa, fa) == (tb, xb, fb)
        assert torch.allclose(torch.tensor(la), torch.tensor(lb), atol=1e-4, rtol=0)


def test_greedy_output_is_identical_and_proposals_are_accepted(make_engine: Callable[..., LLMEngine]) -> None:
    flags = {"dtype": "float32", "max_num_seqs": 8, "block_size": 4}
    plain, spec = make_engine(**flags), make_engine(**flags, **SPEC, speculative_disable_by_batch_size=3)
    seen = spied(spec)
    batch = [
        (
            p,
            SamplingParams(
                max_tokens=random.Random(i).randint(5, 40), temperature=0, ignore_eos=True, logprobs=1
            ),
        )
        for i, p in enumerate(prompts(plain, 16, seed=1))
    ]
    assert_same(generations(plain, batch), generations(spec, batch))
    stats = spec.stats()
    assert stats.spec_accepted_tokens > 0 and stats.spec_draft_tokens > stats.spec_accepted_tokens
    assert stats.spec_drafts == sum(1 for step in seen for p in step if p)
    # Rows with and without proposals shared steps; no step above the batch limit speculated.
    assert any(any(p) and not all(p) for p in seen) and all(len(p) <= 3 for p in seen)
    for engine in (plain, spec):
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_seeded_sampling_and_every_parameter_are_identical(make_engine: Callable[..., LLMEngine]) -> None:
    flags = {"dtype": "float32", "max_num_seqs": 8}
    plain, spec = make_engine(**flags), make_engine(**flags, **SPEC)
    kinds = [
        {"temperature": 0.7, "top_k": 3},
        {"temperature": 0.5, "top_p": 0.8, "min_p": 0.05, "n": 2},
        {"temperature": 0, "repetition_penalty": 1.2, "frequency_penalty": 0.2, "presence_penalty": 0.1},
        {"temperature": 0, "min_tokens": 12, "logit_bias": {5: 3.0}},
        {"temperature": 0.3, "top_k": 5, "repetition_penalty": 0.9},
    ]
    batch = []
    for i, p in enumerate(prompts(plain, 10, seed=2)):
        kind = kinds[i % len(kinds)]
        # Stop strings cut the output wherever they fall, also inside an accepted run of proposals.
        stop = [plain.tokenizer.decode(p[2:4])] if i % 3 == 0 else []
        batch.append((p, SamplingParams(max_tokens=30, seed=i, logprobs=2, stop=stop, **kind)))
    assert_same(generations(plain, batch, stagger=2), generations(spec, batch, stagger=2))
    assert spec.stats().spec_accepted_tokens > 0
    assert spec.blocks.num_free_blocks == spec.blocks.num_blocks


@pytest.fixture(scope="module")
def bigram_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with attention's output projection zeroed: each position's logits depend on its
    own token only, so the exact distribution of a continuation is a product of table lookups."""
    model = load_model(tiny_checkpoint, dtype="float32")
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
    directory = tmp_path_factory.mktemp("bigram")
    save_model(model, directory)
    for f in tiny_checkpoint.iterdir():
        if not (directory / f.name).exists():  # the tokenizer's files
            (directory / f.name).write_bytes(f.read_bytes())
    return directory


def test_sampled_pairs_follow_the_target_distribution(
    make_engine: Callable[..., LLMEngine], bigram_checkpoint: Path
) -> None:
    """Chi-square of (t1, t2) over top-3 sampling against the exact probabilities, with the second
    token proposed (and accepted or rejected) for most rows. Fixed seeds: the counts never change."""
    engine = make_engine(
        model=bigram_checkpoint, dtype="float32", max_num_seqs=32, speculative_disable_by_batch_size=16,
        speculative_method="ngram", prompt_lookup_min=1, prompt_lookup_max=1, num_speculative_tokens=1,
    )  # fmt: skip
    model = load_model(bigram_checkpoint, dtype="float32")
    with torch.no_grad():
        vocab = model.config.vocab_size
        logits = model(torch.arange(vocab)[:, None])[:, 0]
    top = logits.topk(3, dim=-1)
    probs = top.values.softmax(-1)

    def next_of(token: int) -> dict[int, float]:
        return dict(zip(top.indices[token].tolist(), probs[token].tolist(), strict=True))

    last = 100
    firsts = list(next_of(last))
    # Each candidate first token occurs earlier, followed by its likeliest successor: the proposal.
    prompt = [7] + [t for c in firsts for t in (c, top.indices[c, 0].item())] + [last]
    assert len(set(prompt)) == len(prompt)
    expected = {(a, b): pa * pb for a, pa in next_of(last).items() for b, pb in next_of(a).items()}
    params = SamplingParams(n=16, max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)
    results = [r for _ in range(50) for r in run(engine, [submit(engine, prompt, params)])]
    counts = dict.fromkeys(expected, 0)
    for r in results:
        for i in range(16):
            t1, t2, _ = r.tokens(i)
            counts[(t1, t2)] += 1
    total = sum(counts.values())
    chi2 = sum((counts[c] - total * p) ** 2 / (total * p) for c, p in expected.items())
    assert chi2 < 26.12, (chi2, counts)  # 8 degrees of freedom, p = 0.001
    stats = engine.stats()
    assert stats.spec_drafts > total // 2, stats
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens, stats


def test_rollback_leaves_the_cache_and_prefix_cache_as_plain_decoding(
    make_engine: Callable[..., LLMEngine],
) -> None:
    flags = {"dtype": "float32", "block_size": 4}
    plain, spec = make_engine(**flags), make_engine(**flags, **SPEC)
    params = SamplingParams(max_tokens=37, temperature=0.8, top_k=4, seed=3, ignore_eos=True)
    for engine in (plain, spec):
        run(engine, [submit(engine, p, params) for p in prompts(engine, 4, seed=5)])
    stats = spec.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # both accepted and rejected tokens
    # Exactly the same blocks are published, under the same hashes, holding the same keys and values:
    # no rejected token is ever part of a block a later prompt can match.
    assert set(plain.blocks.cached) == set(spec.blocks.cached) and plain.blocks.cached
    bs = plain.blocks.block_size
    for h, block in plain.blocks.cached.items():
        other = spec.blocks.cached[h]
        for (k0, v0), (k1, v1) in zip(plain.runner.cache, spec.runner.cache, strict=True):
            a, b = slice(block * bs, (block + 1) * bs), slice(other * bs, (other + 1) * bs)
            assert torch.allclose(k0[a], k1[b], atol=1e-5) and torch.allclose(v0[a], v1[b], atol=1e-5)
    assert spec.blocks.num_free_blocks == spec.blocks.num_blocks


def test_abort_mid_verification_frees_every_block(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(dtype="float32", block_size=4, **SPEC)
    free = engine.blocks.num_free_blocks
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    result = submit(engine, [11, 12, 13, 14] * 6, params)
    for _ in range(50):
        engine.step()
        if engine.stats().spec_drafts:
            break
    seq = result.request.sequences[0]
    assert engine.stats().spec_drafts and seq.block_table and not seq.is_finished
    # The table holds what the accepted tokens need and no more.
    assert len(seq.block_table) == -(-seq.num_tokens // engine.blocks.block_size)
    engine.abort(result.request)
    assert engine.blocks.num_free_blocks == free and not engine.has_work


def test_max_tokens_inside_an_accepted_run_ends_there(make_engine: Callable[..., LLMEngine]) -> None:
    plain, spec = make_engine(dtype="float32"), make_engine(dtype="float32", **SPEC, num_speculative_tokens=8)
    prompt = [21, 22, 23, 24, 25] * 8
    for max_tokens in (1, 2, 3, 7, 11):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0)
        assert_same(run(plain, [submit(plain, prompt, params)]), run(spec, [submit(spec, prompt, params)]))
        assert spec.blocks.num_free_blocks == spec.blocks.num_blocks


def test_stop_strings_inside_an_accepted_run_end_there(make_engine: Callable[..., LLMEngine]) -> None:
    plain, spec = make_engine(dtype="float32"), make_engine(dtype="float32", **SPEC, num_speculative_tokens=8)
    free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for prompt in prompts(plain, 8, seed=1)[::2]:  # the repetitive ones
        text = run(plain, [submit(plain, prompt, free)])[0].text()
        # A prefix of the output as the stop string ends it exactly there: late, where the output
        # loops and proposals are accepted several at a time.
        for cut in (len(text) * 2 // 3, len(text) - 1):
            stop = [text[: min(cut, 250)]]
            params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=stop, logprobs=0)
            got = run(spec, [submit(spec, prompt, params)])
            assert_same(run(plain, [submit(plain, prompt, params)]), got)
            assert got[0].finish_reason() == "stop"
    assert spec.stats().spec_accepted_tokens > 0
    assert spec.blocks.num_free_blocks == spec.blocks.num_blocks


def test_constrained_rows_speculate_within_their_grammar(make_engine: Callable[..., LLMEngine]) -> None:
    """Row j of a constrained sequence is masked by the grammar after the proposals before it; only
    proposals the grammar accepts are verified. Output identical to plain decoding."""
    plain, spec = make_engine(dtype="float32"), make_engine(dtype="float32", **SPEC)
    seen = spied(spec)
    pattern = "(ab|cd){6,20}"
    free = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    constrained = [
        SamplingParams(max_tokens=30, temperature=0, logprobs=1),
        SamplingParams(max_tokens=30, temperature=0.9, seed=4, logprobs=1),
    ]
    out = []
    for engine in (plain, spec):
        grammar = engine.grammars.compile(Constraint("regex", pattern, "guided_regex"))
        results = [submit(engine, p, free) for p in prompts(engine, 4, seed=9)[::2]]
        results += [submit(engine, [30, 31, 32] * 4, params, grammar) for params in constrained]
        out.append(run(engine, results))
    assert_same(*out)
    for r in out[1][2:]:
        assert re.fullmatch(pattern, r.text()), r.text()
    assert any(any(p[2:]) for p in seen if len(p) == 4)  # the constrained rows were proposed for
    assert spec.stats().spec_accepted_tokens > 0
    assert spec.blocks.num_free_blocks == spec.blocks.num_blocks


def test_a_prompt_only_request_finishing_in_a_verify_step_generates_nothing(
    make_engine: Callable[..., LLMEngine],
) -> None:
    """Its last one-token prefill chunk shares a decode-only step with a speculating row."""
    flags = {"dtype": "float32", "prefill_chunk_tokens": 8}
    plain, spec = make_engine(**flags), make_engine(**flags, **SPEC)
    seen = spied(spec)
    scored = SamplingParams(max_tokens=0, prompt_logprobs=1)
    free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    out = []
    for engine in (plain, spec):
        looping = prompts(engine, 8, seed=1)[6]  # proposals accepted from early on
        arrivals = {12: [(list(range(40, 49)), scored)]}  # 9 tokens: chunks of 8, then 1
        out.append(run(engine, [submit(engine, looping, free)], arrivals=arrivals))
    assert_same(*out)
    only = out[1][1]
    assert (
        only.tokens() == [] and only.finish_reason() == "length" and len(only.deltas[0].prompt_logprobs) == 9
    )
    assert any(len(p) == 2 and p[0] and not p[1] for p in seen)  # the one-token chunk beside a proposal


def test_a_single_stream_engine_compiles_buckets_for_its_verify_rows(
    make_engine: Callable[..., LLMEngine],
) -> None:
    engine = make_engine(max_num_seqs=1, **SPEC, num_speculative_tokens=4)  # a verify step is 5 rows
    assert engine.runner.buckets == [1, 2, 4, 8]
    run(
        engine, [submit(engine, [9, 8, 7] * 5, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))]
    )
    assert engine.stats().spec_drafts > 0


def test_compiled_verification_matches_and_never_recompiles(make_engine: Callable[..., LLMEngine]) -> None:
    flags = {"dtype": "float32", "max_num_seqs": 8, "enforce_eager": False}
    plain, spec = make_engine(**flags), make_engine(**flags, **SPEC)
    batch = [(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)) for p in prompts(plain, 6, 7)]
    expected = generations(plain, batch)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = generations(spec, batch)
    assert_same(expected, got)
    assert spec.stats().spec_accepted_tokens > 0


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same tokenizer, other random weights: a draft whose proposals are mostly rejected."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("draft"), seed=1)


def test_draft_model_greedy_and_seeded_outputs_are_identical(
    make_engine: Callable[..., LLMEngine], tiny_checkpoint: Path, other_draft: Path
) -> None:
    flags = {"dtype": "float32", "max_num_seqs": 8, "block_size": 4}
    plain = make_engine(**flags)
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=1)
    seeded = SamplingParams(max_tokens=30, temperature=0.8, top_k=4, seed=9, ignore_eos=True)
    for draft in (tiny_checkpoint, other_draft):
        spec = make_engine(**flags, speculative_method="draft", speculative_model=draft)
        for params in (greedy, seeded):
            batch = [(p, params) for p in prompts(plain, 6, seed=4)]
            before = spec.stats()
            assert_same(generations(plain, batch), generations(spec, batch))
            after = spec.stats()
            drafted = after.spec_draft_tokens - before.spec_draft_tokens
            accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
            assert drafted > 0
            if draft == tiny_checkpoint and params is greedy:
                assert accepted >= 0.9 * drafted  # the draft is the model: its greedy tokens are the model's
        assert spec.speculator is not None and spec.speculator.draft is not None
        draft_blocks = spec.speculator.draft.blocks
        assert spec.blocks.num_free_blocks == spec.blocks.num_blocks
        assert draft_blocks.num_free_blocks == draft_blocks.num_blocks  # every shadow released


def test_the_draft_catches_up_on_the_decode_path(
    make_engine: Callable[..., LLMEngine], tiny_checkpoint: Path
) -> None:
    """After its prompt, a draft that is always right misses two tokens each step (its last proposal and
    the target's next): they run as a verify layout of the decode buckets, not through the general
    path as a chunk of two tokens, and the draft stays right."""
    engine = make_engine(dtype="float32", speculative_method="draft", speculative_model=tiny_checkpoint)
    assert engine.speculator is not None and engine.speculator.draft is not None
    runner = engine.speculator.draft.runner
    with mock.patch.object(runner, "_execute_general", wraps=runner._execute_general) as general:
        run(
            engine,
            [submit(engine, [40, 41, 42], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))],
        )
    chunks = [max(call.args[0].num_tokens) for call in general.call_args_list]  # eager: decodes go there too
    assert sum(n > 1 for n in chunks) == 1  # the prompt
    stats = engine.stats()
    assert stats.spec_drafts >= 10 and stats.spec_accepted_tokens >= 0.9 * stats.spec_draft_tokens


def test_a_row_whose_proposals_fail_rests(
    make_engine: Callable[..., LLMEngine], tiny_checkpoint: Path, other_draft: Path
) -> None:
    """A draft that is never right gets WINDOW drafts, then rests REST_STEPS steps, and so on, and after
    its first miss proposes about one token a draft; a draft that is always right never rests and keeps
    proposing k tokens."""
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    k = EngineConfig.num_speculative_tokens
    drafts = {}
    for draft in (other_draft, tiny_checkpoint):
        engine = make_engine(dtype="float32", speculative_method="draft", speculative_model=draft)
        run(engine, [submit(engine, [40, 41, 42], params)])
        drafts[draft] = engine.stats()
    bad, good = drafts[other_draft], drafts[tiny_checkpoint]
    assert bad.spec_accepted_tokens < 0.2 * bad.spec_draft_tokens
    rounds = -(-119 // (WINDOW + REST_STEPS))  # decode steps, in rounds of drafting and resting
    assert WINDOW <= bad.spec_drafts <= rounds * WINDOW
    assert good.spec_accepted_tokens >= 0.9 * good.spec_draft_tokens
    assert good.spec_drafts >= 119 // (good.spec_emitted_tokens / good.spec_drafts) - 1  # every step drafted
    assert bad.spec_draft_tokens < 1.5 * bad.spec_drafts
    assert good.spec_draft_tokens >= 0.9 * k * good.spec_drafts  # less only where the sequence ends


def test_abort_frees_the_draft_models_blocks_too(
    make_engine: Callable[..., LLMEngine], tiny_checkpoint: Path
) -> None:
    engine = make_engine(dtype="float32", speculative_method="draft", speculative_model=tiny_checkpoint)
    assert engine.speculator is not None and engine.speculator.draft is not None
    draft = engine.speculator.draft.blocks
    result = submit(
        engine, [11, 12, 13, 14] * 6, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    )
    for _ in range(20):
        engine.step()
    assert engine.stats().spec_drafts and draft.num_free_blocks < draft.num_blocks
    engine.abort(result.request)
    assert draft.num_free_blocks == draft.num_blocks
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_draft_with_another_vocabulary_is_refused(
    make_engine: Callable[..., LLMEngine], tmp_path: Path
) -> None:
    other = make_tiny_checkpoint(tmp_path / "other", added_tokens=("<extra>",))
    with pytest.raises(ValueError, match="tokenizer is not the served model's"):
        make_engine(speculative_method="draft", speculative_model=other)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"num_speculative_tokens": 0}, "--num-speculative-tokens must be in [1, "),
        ({"num_speculative_tokens": 64}, "--num-speculative-tokens must be in [1, "),
        ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "--prompt-lookup-min"),
        ({"deterministic": True}, "--deterministic"),
        ({"speculative_method": "beam"}, "--speculative-method must be one of ngram, draft"),
        ({"speculative_method": "draft"}, "--speculative-model goes with --speculative-method draft"),
        ({"speculative_model": Path("weights/default")}, "--speculative-model goes with"),
    ],
)
def test_bad_combinations_fail_at_start(
    make_engine: Callable[..., LLMEngine], flags: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        make_engine(**{"speculative_method": "ngram", **flags})


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_bfloat16_greedy_verification_is_token_for_token_plain_decoding(
    make_engine: Callable[..., LLMEngine], enforce_eager: bool
) -> None:
    """In bfloat16 too: a verify step's rows are computed exactly as each would be alone (the CPU
    projections and attention sum every row in the same order whatever shares the batch)."""
    flags = {"dtype": "bfloat16", "max_num_seqs": 4, "enforce_eager": enforce_eager}
    plain, spec = make_engine(**flags), make_engine(**flags, **SPEC, num_speculative_tokens=6)
    # Four sequences of up to 7 verify rows each: steps of up to 28 rows.
    batch = [
        (p, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=1))
        for p in prompts(plain, 4, 3)
    ]
    expected, got = generations(plain, batch), generations(spec, batch)
    for (ta, xa, fa, la), (tb, xb, fb, lb) in zip(outputs(expected), outputs(got), strict=True):
        assert (ta, xa, fa, la) == (tb, xb, fb, lb)
    assert spec.stats().spec_accepted_tokens > 0
