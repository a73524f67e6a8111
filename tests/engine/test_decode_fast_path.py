"""The compiled decode fast path against the eager general path, and the paged-attention op alone."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.harness import ROOT
from model.attention import paged_decode_attention, reference_decode
from model.checkpoint import load_model, save_model
from model.kernels import load_cpu_kernels
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from server.engine.core import LLMEngine
from server.engine.params import SamplingParams
from tests.engine.engine_driver import Result, run, submit

BUCKETS_UP_TO = 8  # buckets 1, 2, 4, 8: every one gets used below


def traffic(engine: LLMEngine, seed: int) -> list[Result]:
    """Sequences joining, finishing at different lengths, n > 1 and seeded sampling, up to 8 at once;
    some greedy rows ask for logprobs and some do not (those take the compiled step's greedy picks)."""
    rng = random.Random(seed)
    vocab = engine.tokenizer.vocab_size
    arrivals: dict[int, list[tuple[list[int], SamplingParams]]] = {}
    for i in range(14):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(
            max_tokens=rng.randint(3, 30),
            temperature=0 if i % 3 else 0.8,
            seed=i,
            n=2 if i % 5 == 0 else 1,
            logprobs=0 if i % 4 else None,
            ignore_eos=True,
        )
        arrivals.setdefault(rng.randrange(0, 40), []).append((prompt, params))
    return run(engine, [], arrivals=arrivals)


def summary(results: list[Result]) -> list[tuple[list[int], list[float]]]:
    out = []
    for r in results:
        for index in range(r.request.params.n):
            deltas = [d for d in r.deltas if d.index == index]
            out.append(
                (
                    [t for d in deltas for t in d.token_ids],
                    [lp.logprob for d in deltas for lp in d.logprobs or []],
                )
            )
    return out


@pytest.mark.parametrize("kv_cache_tokens", [4096, 384])  # 384: too small for all, so sequences get preempted
def test_compiled_decode_equals_eager_in_float32(
    make_engine: Callable[..., LLMEngine], kv_cache_tokens: int
) -> None:
    flags = {
        "dtype": "float32",
        "max_num_seqs": BUCKETS_UP_TO,
        "kv_cache_tokens": kv_cache_tokens,
        "max_model_len": 128,
    }
    compiled = make_engine(enforce_eager=False, **flags)
    assert compiled.runner.fast_path and compiled.runner.buckets == [1, 2, 4, 8]
    eager = make_engine(enforce_eager=True, **flags)
    fast, slow = summary(traffic(compiled, seed=1)), summary(traffic(eager, seed=1))
    assert [tokens for tokens, _ in fast] == [tokens for tokens, _ in slow]
    for (_, a), (_, b) in zip(fast, slow, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    assert compiled.blocks.num_used_blocks == 0


def test_compiled_decode_greedy_tokens_equal_eager_in_bfloat16(make_engine: Callable[..., LLMEngine]) -> None:
    flags = {"dtype": "bfloat16", "max_num_seqs": 4}
    compiled, eager = make_engine(enforce_eager=False, **flags), make_engine(enforce_eager=True, **flags)
    prompts = [compiled.tokenizer.encode(t) for t in ("def main():\n", "import os\n", "class A:\n", "x = [")]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    a = run(compiled, [submit(compiled, p, params) for p in prompts])
    b = run(eager, [submit(eager, p, params) for p in prompts])
    assert [r.tokens() for r in a] == [r.tokens() for r in b]


def test_engines_of_different_models_keep_their_own_graphs(
    make_engine: Callable[..., LLMEngine], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Each runner's decode graphs are looked up by its input shapes alone (see ModelRunner._compile), so
    they must be its own: engines whose caches and inputs look alike (a narrower MLP, int8 weights)
    compiled in one process each decode exactly as their eager twins."""
    model = load_model(tiny_checkpoint)
    narrow = Transformer(replace(model.config, intermediate_size=96))
    narrow.init_weights(seed=3)
    save_model(narrow, tmp_path)
    Tokenizer.load(tiny_checkpoint).save(tmp_path)
    variants = [
        {"model": tiny_checkpoint},
        {"model": tmp_path},
        {"model": tiny_checkpoint, "quantization": "int8"},
    ]
    flags = {"dtype": "float32", "max_num_seqs": 4}
    compiled = [make_engine(enforce_eager=False, **flags, **v) for v in variants]  # all compiled first
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    prompt = compiled[0].tokenizer.encode("def main():\n")
    outputs = []
    for engine, variant in zip(compiled, variants, strict=True):
        eager = make_engine(enforce_eager=True, **flags, **variant)
        fast, slow = (summary(run(e, [submit(e, prompt, params)])) for e in (engine, eager))
        assert fast[0][0] == slow[0][0]
        assert torch.allclose(torch.tensor(fast[0][1]), torch.tensor(slow[0][1]), atol=1e-4, rtol=0)
        outputs.append(fast[0][0])
    assert outputs[0] != outputs[1]  # different models: a shared graph could not pass for both


@pytest.mark.parametrize(("model", "dtype"), [("shipped", "bfloat16"), ("tiny", "float32")])
def test_a_rows_logits_are_the_same_in_every_bucket(
    make_engine: Callable[..., LLMEngine], model: str, dtype: str
) -> None:
    """Bit for bit: what pads or shares a compiled decode step cannot change a sequence's logits, the
    one-row bucket's included. (Unless the graphs round where eager rounds, inductor's one-row graph
    fused the shipped model's residual adds into the next norm unrounded: the tiny model hid that.)"""
    shipped = {"model": ROOT / "weights" / "default"} if model == "shipped" else {}
    engine = make_engine(enforce_eager=False, dtype=dtype, max_num_seqs=BUCKETS_UP_TO, **shipped)
    assert engine.runner.buckets == [1, 2, 4, 8]
    submit(engine, list(range(3, 40)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.step()  # the prompt
    runner, batch = engine.runner, engine.runner.input_batch
    for _ in range(6):  # at six positions
        engine.step()
        batch.update(engine.scheduler.running)
        logits = []
        with torch.inference_mode():
            for rows in runner.buckets:
                batch.prepare_decode(rows)
                logits.append(runner._decode(*batch.device_tensors(rows))[0][0].clone())
        assert all(torch.equal(logits[0], other) for other in logits[1:])


def test_steady_state_traffic_never_recompiles(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(enforce_eager=False, max_num_seqs=BUCKETS_UP_TO)  # warm-up compiled every bucket
    with torch.compiler.set_stance("fail_on_recompile"):
        results = traffic(engine, seed=2)
    assert all(r.finished is not None for r in results)


def test_non_finite_logits_on_the_compiled_path_fail_only_that_request(
    make_engine: Callable[..., LLMEngine],
) -> None:
    """The compiled step's own finiteness flags (`greedy_picks`) reach the sampler: a row whose cache
    turned to NaN fails its request, and the rows beside it in the same steps decode as before."""
    engine = make_engine(enforce_eager=False, dtype="float32", max_num_seqs=4, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [engine.tokenizer.encode(f"row {i} " * (i + 1)) for i in range(3)]
    clean = [r.tokens() for r in run(engine, [submit(engine, p, params) for p in prompts])]
    results = [submit(engine, p, params) for p in prompts]
    victim = results[1].request.sequences[0]
    bs = engine.blocks.block_size

    def poison(_: int) -> None:
        if victim.num_output_tokens == 3 and not victim.is_finished:
            for k, v in engine.runner.cache:
                for block in victim.block_table:
                    k[block * bs : (block + 1) * bs] = float("nan")
                    v[block * bs : (block + 1) * bs] = float("nan")

    run(engine, results, on_step=poison)
    assert results[1].error is not None and "non-finite" in str(results[1].error)
    assert results[1].tokens() == clean[1][:3]
    assert [results[i].tokens() for i in (0, 2)] == [clean[0], clean[2]]
    assert engine.blocks.num_used_blocks == 0


def test_padding_rows_write_only_the_sink(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(enforce_eager=False, dtype="float32", max_num_seqs=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    results = [submit(engine, engine.tokenizer.encode(f"row {i} " * (i + 1)), params) for i in range(3)]
    while any(s.num_output_tokens == 0 for r in results for s in r.request.sequences):
        engine.step()  # prefills: now three rows decode, padded to the bucket of four
    seqs = [r.request.sequences[0] for r in results]
    before = [(k.clone(), v.clone()) for k, v in engine.runner.cache]
    bs = engine.blocks.block_size
    # The slots of the three rows' new tokens: the only ones besides the sink that may change.
    slots = {s.block_table[(s.num_tokens - 1) // bs] * bs + (s.num_tokens - 1) % bs for s in seqs}
    engine.step()
    assert engine.last_step is not None and engine.last_step.decode_rows == 3
    sink = engine.runner.input_batch.sink_slot
    for (k0, v0), (k1, v1) in zip(before, engine.runner.cache, strict=True):
        changed = ((k0 != k1).flatten(1).any(1) | (v0 != v1).flatten(1).any(1)).nonzero().flatten().tolist()
        assert slots <= set(changed) <= slots | set(range(sink, sink + bs)), changed
        assert not k1[:bs].any() and not v1[:bs].any()  # the null block stays zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block"),
    # The AVX-512 path's query heads in passes of eight and of four, and values in chunks of 64 features
    # with a last 16, 32 or 48.
    [(4, 2, 16, 16), (9, 3, 64, 16), (6, 6, 32, 8), (10, 1, 96, 16), (4, 4, 48, 16)],
)
@pytest.mark.parametrize("spread", [1.0, 40.0])  # 40: scores far apart, exponentials underflow to 0
def test_cpu_kernel_matches_the_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block: int, spread: float
) -> None:
    if not load_cpu_kernels():
        pytest.skip("no C++ compiler: the op runs its reference body")
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(400 * block, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(400 * block, kv_heads, dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 0, 17, 700, 1500, block], dtype=torch.int32)  # a padding row among them
    tables = torch.randint(1, 400, (6, 1500 // block + 1), generator=gen, dtype=torch.int32)
    q = (spread * torch.randn(6, heads, dim, generator=gen)).to(dtype)
    none = torch.empty(0, kv_heads, dim, dtype=dtype)
    out = paged_decode_attention(
        q, none, none, k_cache, v_cache, torch.empty(0, dtype=torch.long), tables, lens, block, dim**-0.5
    )
    # In float64: at spread 40 the float32 reference itself is 2e-5 off.
    ref = reference_decode(q.double(), k_cache.double(), v_cache.double(), tables, lens, block, dim**-0.5)
    live = lens > 0
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.double()[live], ref[live], atol=tol, rtol=tol)
    assert not out[~live].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", ["key", "value"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cpu_kernel_spreads_non_finite_keys_and_values_as_exact_attention_does(
    dtype: torch.dtype, cache: str, bad: float
) -> None:
    """A NaN or an infinity in a live key or value reaches the output as in exact attention (so the
    sampler fails that request rather than draw from a row that silently skipped a position),
    wherever it lies: the first lane of a block, the middle of an eight-key group, a block's scalar
    tail, a later split of a long row, a short row's last position, or every position of a row."""
    if not load_cpu_kernels():
        pytest.skip("no C++ compiler: the op runs its reference body")
    gen = torch.Generator().manual_seed(5)
    block, heads, kv_heads, dim, width = 16, 4, 2, 32, 94
    lens = torch.tensor([1500, 1500, 1500, 1500, 1500, 37, 13, 0], dtype=torch.int32)  # and a padding row
    # 1500 = 93 blocks + 12: the last block has a 4-key scalar tail. Row 6: all of its 13 positions.
    where = [[0], [5], [13], [700], [1499], [36], range(13)]
    rows = len(lens)
    tables = (torch.randperm(rows * width, generator=gen) + 1).view(rows, width).to(torch.int32)  # unshared
    k_cache = torch.randn((rows * width + 1) * block, kv_heads, dim, generator=gen)
    v_cache = torch.randn((rows * width + 1) * block, kv_heads, dim, generator=gen)
    poisoned = k_cache if cache == "key" else v_cache
    for row, positions in enumerate(where):
        for pos in positions:
            poisoned[tables[row, pos // block] * block + pos % block, row % kv_heads, 3] = bad
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    q = torch.randn(rows, heads, dim, generator=gen).to(dtype)
    none = torch.empty(0, kv_heads, dim, dtype=dtype)
    out = paged_decode_attention(
        q, none, none, k_cache, v_cache, torch.empty(0, dtype=torch.long), tables, lens, block, dim**-0.5
    ).double()
    ref = reference_decode(q.double(), k_cache.double(), v_cache.double(), tables, lens, block, dim**-0.5)
    live = lens > 0
    out, ref = out[live], ref[live]
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out[finite], ref[finite], atol=tol, rtol=tol)
    if bad != bad or cache == "value":  # NaN anywhere, or an infinite value: that kv group's heads are hit
        group = heads // kv_heads
        for row in range(len(where)):
            h = row % kv_heads
            assert not out[row, h * group : (h + 1) * group].isfinite().all(), row


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
        ),
    ],
)
def test_op_writes_the_new_keys_then_attends_to_them(device: str) -> None:
    load_cpu_kernels()
    k_cache = torch.zeros(64, 2, 8, device=device)
    v_cache = torch.zeros(64, 2, 8, device=device)
    q, k, v = (
        torch.randn(1, 4, 8, device=device),
        torch.randn(1, 2, 8, device=device),
        torch.randn(1, 2, 8, device=device),
    )
    tables = torch.tensor([[3, 0]], dtype=torch.int32, device=device)
    out = paged_decode_attention(
        q, k, v, k_cache, v_cache, torch.tensor([16 * 3], device=device), tables,
        torch.tensor([1], dtype=torch.int32, device=device), 16, 8**-0.5,
    )  # fmt: skip
    assert torch.equal(k_cache[48], k[0]) and torch.equal(v_cache[48], v[0])
    # One visible token: each query head's output is that token's value (its kv head's).
    assert torch.allclose(out[0], v[0].repeat_interleave(2, dim=0), atol=1e-6)


def test_reference_body_ignores_garbage_past_each_rows_length() -> None:
    """The body CUDA runs: NaN in the unwritten rest of a row's last block must not reach its output."""
    gen = torch.Generator().manual_seed(3)
    block, kv_heads, dim = 4, 2, 8
    clean_k, clean_v = (
        torch.randn(40, kv_heads, dim, generator=gen),
        torch.randn(40, kv_heads, dim, generator=gen),
    )
    clean_k[:block], clean_v[:block] = 0, 0  # the null block
    lens = torch.tensor([6, 0], dtype=torch.int32)  # row 0: block 2 full, block 5 half; row 1: padding
    tables = torch.tensor([[2, 5, 0], [0, 0, 0]], dtype=torch.int32)
    dirty_k, dirty_v = clean_k.clone(), clean_v.clone()
    dirty_k[22:24], dirty_v[22:24] = float("nan"), float("nan")  # block 5, positions 6 and 7: unwritten
    q = torch.randn(2, 4, dim, generator=gen)
    want = reference_decode(q, clean_k, clean_v, tables, lens, block, dim**-0.5)
    got = reference_decode(q, dirty_k, dirty_v, tables, lens, block, dim**-0.5)
    assert torch.isfinite(got).all() and torch.equal(got[0], want[0])
