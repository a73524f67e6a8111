"""The engine with `quantization="int8"`: the compiled decode path equals the eager one, seeded sampling
repeats, prefix caching and batch-invariant mode keep their meaning, and nothing leaks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.quantization import Int8Linear
from server.engine.core import LLMEngine
from server.engine.params import SamplingParams
from tests.engine.engine_driver import run, submit
from tests.engine.test_decode_fast_path import summary, traffic


def test_int8_compiled_decode_equals_eager_under_traffic(make_engine: Callable[..., LLMEngine]) -> None:
    """Joining, finishing, n > 1, seeded sampling and preemption (a cache too small for all)."""
    flags = {
        "dtype": "float32",
        "quantization": "int8",
        "max_num_seqs": 4,  # buckets 1, 2, 4; the traffic queues behind them
        "kv_cache_tokens": 384,
        "max_model_len": 128,
    }
    compiled = make_engine(enforce_eager=False, **flags)
    eager = make_engine(enforce_eager=True, **flags)
    assert isinstance(compiled.model.lm_head, Int8Linear) and compiled.weights.startswith("int8 weights")
    fast, slow = summary(traffic(compiled, seed=4)), summary(traffic(eager, seed=4))
    assert [tokens for tokens, _ in fast] == [tokens for tokens, _ in slow]
    for (_, a), (_, b) in zip(fast, slow, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    assert compiled.blocks.num_used_blocks == 0 and eager.blocks.num_used_blocks == 0


def test_int8_seeded_sampling_repeats_and_prefix_caching_changes_nothing(
    make_engine: Callable[..., LLMEngine],
) -> None:
    cached = make_engine(quantization="int8", dtype="bfloat16")
    uncached = make_engine(quantization="int8", dtype="bfloat16", enable_prefix_caching=False)
    shared = cached.tokenizer.encode("def parse(path):\n    with open(path) as f:\n" * 3)
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    first = run(cached, [submit(cached, shared, params)])[0].tokens()
    again = run(cached, [submit(cached, shared, params)])[0].tokens()  # its prefix now comes from the cache
    assert cached.stats().prefix_cache_hit_tokens > 0
    fresh = run(uncached, [submit(uncached, shared, params)])[0].tokens()
    assert first == again == fresh and len(first) == 24


def test_int8_deterministic_mode_is_batch_invariant(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(quantization="int8", dtype="float32", deterministic=True)
    prompts = [engine.tokenizer.encode(t) for t in ("import sys\n", "for i in range(", "while True:\n")]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    alone = [run(engine, [submit(engine, p, params)])[0] for p in prompts]
    together = run(engine, [submit(engine, p, params) for p in prompts])
    for a, b in zip(alone, together, strict=True):
        assert a.tokens() == b.tokens()
        assert [lp.logprob for d in a.deltas for lp in d.logprobs] == [
            lp.logprob for d in b.deltas for lp in d.logprobs
        ]
