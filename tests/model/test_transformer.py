"""The model against its oracles: transformers' Llama (logits, greedy) and its own no-cache forward.

The cache-path helpers below build `CacheBatch`es the way an engine would (shuffled slot tables,
padded read slots, masks), so these tests pin the contract the runner relies on.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

from model.activations import ACTIVATIONS
from model.checkpoint import load_model
from model.compute import native_bfloat16
from model.config import ModelConfig
from model.kernels import load_cpu_kernels
from model.linear import ServingLinear, unpack
from model.quantization import quantize_rows
from model.transformer import AttentionGroup, CacheBatch, KVCache, Transformer
from tests.model.model_helpers import one_thread, randomize_  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA_SKIP = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------
# Parity with transformers' LlamaForCausalLM
# ---------------------------------------------------------------------------------------------------

HF_CASES: dict[str, dict[str, Any]] = {
    "gqa": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    ),
    "mha_tied_theta": dict(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-6,
    ),
    "odd_sizes_bias": dict(
        vocab_size=131,
        hidden_size=72,
        intermediate_size=100,
        num_attention_heads=6,
        num_key_value_heads=3,
        attention_bias=True,
        mlp_bias=True,
        rms_norm_eps=1e-2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    ),
    "mqa_llama3_rope": dict(
        vocab_size=160,
        hidden_size=48,
        intermediate_size=80,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        # head_dim 12, theta 5e4: wavelengths 6, 38, 231, ... cover all three llama3 regimes for 64.
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "linear_rope_tied": dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ),
    "explicit_head_dim": dict(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=3,
    ),
    # head_dim 16 over an original context of 32: the ramp runs from dimension 0 to 6 of 8, so
    # frequencies are interpolated, kept and blended; cos/sin carry the attention factor 1.139.
    "yarn_rope": dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "yarn_mscale_untruncated_gelu": dict(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=80,
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_act="gelu_pytorch_tanh",
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 16,
            "beta_slow": 2,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "truncate": False,
        },
    ),
    "yarn_attention_factor_relu2": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        hidden_act="relu2",
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 2.0,
            "original_max_position_embeddings": 64,
            "attention_factor": 0.8,
        },
    ),
}


def make_hf_model(case: str, seed: int = 0) -> LlamaForCausalLM:
    kwargs = {"num_hidden_layers": 2, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    kwargs.update(HF_CASES[case])
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    randomize_(model, seed)
    return model


def save_and_reload_hf(
    model: LlamaForCausalLM, directory: Path, dtype: torch.dtype, **kwargs: Any
) -> LlamaForCausalLM:
    """Save `model` in `dtype` and return transformers' own load of the directory, the reference.

    Reloading (rather than casting in memory) matters: `.to(bfloat16)` would also round
    transformers' rotary inv_freq buffer, which from_pretrained keeps in float32.
    """
    copy.deepcopy(model).to(dtype).save_pretrained(directory, **kwargs)
    return reload_hf(directory, dtype)


def reload_hf(directory: Path, dtype: torch.dtype) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def prompts(vocab_size: int, batch: int = 2, length: int = 24, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_matches_hf(ours: Transformer, hf: LlamaForCausalLM, atol: float, greedy: bool = True) -> None:
    ids = prompts(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.dtype == expected.dtype
    diff = (got.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"max |logits - transformers| = {diff:.3g} > {atol}"
    if greedy:
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False)
        out = ours.generate(ids, max_new_tokens=20)
        assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_float32_checkpoint_matches_transformers(case: str, tmp_path: Path) -> None:
    hf = save_and_reload_hf(make_hf_model(case), tmp_path, torch.float32)
    ours = load_model(tmp_path)
    assert next(ours.parameters()).dtype == torch.float32
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert_matches_hf(ours, hf, atol=1e-4)


def test_every_activation_computes_as_transformers_does() -> None:
    """Each `hidden_act` we accept is transformers' function to the bit; each it has that we refuse
    carries learned parameters of its own (so a new one in transformers fails here, not silently)."""
    x = torch.linspace(-12.0, 12.0, 2001)
    for name, act in ACTIVATIONS.items():
        assert torch.equal(act(x), ACT2FN[name](x)), name
    assert set(ACT2FN) - set(ACTIVATIONS) == {"prelu", "xielu"}


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", ["gqa", "odd_sizes_bias", "mqa_llama3_rope", "yarn_mscale_untruncated_gelu"])
def test_half_precision_checkpoint_matches_transformers(case: str, dtype_name: str, tmp_path: Path) -> None:
    dtype = DTYPES[dtype_name]
    hf = save_and_reload_hf(make_hf_model(case, seed=1), tmp_path, dtype)
    # Loaded as stored, both models compute in the half type: close, not bit-equal (op order differs).
    ours = load_model(tmp_path)
    assert next(ours.parameters()).dtype == dtype
    assert_matches_hf(ours, hf, atol=0.01 if dtype == torch.bfloat16 else 1e-3, greedy=False)
    # Upcast to float32 on load, the same rounded weights must give transformers' logits exactly.
    ours32 = load_model(tmp_path, dtype=torch.float32)
    assert_matches_hf(ours32, reload_hf(tmp_path, torch.float32), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# The cached path (flat batch, CacheBatch) equals the no-cache forward
# ---------------------------------------------------------------------------------------------------

CACHE_CASES: dict[str, ModelConfig] = {
    "gqa": ModelConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "mha_bias": ModelConfig(
        vocab_size=89,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        attention_bias=True,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
}
NUM_SLOTS = 256


def make_model(
    case: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    model = Transformer(CACHE_CASES[case]).eval()
    randomize_(model, seed)
    return model.to(device=device, dtype=dtype)


def make_cache(model: Transformer, num_slots: int = NUM_SLOTS, seed: int = 0) -> KVCache:
    """Cache filled with large finite garbage: reading a slot nobody wrote, unmasked, shows up."""
    cfg, p = model.config, next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    shape = (num_slots, cfg.num_key_value_heads, cfg.head_dim)

    def garbage() -> Tensor:
        return (50 * torch.randn(shape, generator=gen)).to(p.device, p.dtype)

    return [(garbage(), garbage()) for _ in range(cfg.num_hidden_layers)]


@dataclass
class Row:
    """One sequence's share of a step: `tokens` are new, at positions start .. start + len - 1."""

    tokens: list[int]
    start: int
    slots: Tensor  # the sequence's slot table: slot of position i is slots[i]

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def build_step(
    groups: list[list[Row]], pad_slot: int, device: str = "cpu"
) -> tuple[Tensor, Tensor, CacheBatch]:
    """Flat tokens, positions and the CacheBatch for `groups` (rows of one group share a q_len)."""
    tokens: list[int] = []
    positions: list[int] = []
    writes: list[Tensor] = []
    attn: list[AttentionGroup] = []
    start = 0
    for rows in groups:
        q_len = len(rows[0].tokens)
        assert all(len(r.tokens) == q_len for r in rows)
        kv_len = max(r.end for r in rows)
        read = torch.full((len(rows), kv_len), pad_slot, dtype=torch.long)
        mask = torch.zeros(len(rows), 1, q_len, kv_len, dtype=torch.bool)
        for b, r in enumerate(rows):
            read[b, : r.end] = r.slots[: r.end]
            query_pos = torch.arange(r.start, r.end)[:, None]
            mask[b, 0] = torch.arange(kv_len)[None, :] <= query_pos
            tokens += r.tokens
            positions += range(r.start, r.end)
            writes.append(r.slots[r.start : r.end])
        attn.append(
            AttentionGroup(start, len(rows), q_len, kv_len, read.flatten().to(device), mask.to(device))
        )
        start += len(rows) * q_len
    batch = CacheBatch(write_slots=torch.cat(writes).to(device), groups=attn)
    return torch.tensor(tokens, device=device), torch.tensor(positions, device=device), batch


class SlotAllocator:
    """Hands out shuffled, non-contiguous slots; one slot is kept back, never written, for padding."""

    def __init__(self, seed: int, num_slots: int = NUM_SLOTS) -> None:
        self.free = torch.randperm(num_slots, generator=torch.Generator().manual_seed(seed)).tolist()
        self.pad_slot = self.free.pop()

    def take(self, n: int) -> Tensor:
        out, self.free = self.free[:n], self.free[n:]
        return torch.tensor(out, dtype=torch.long)


def full_logits(model: Transformer, seq: list[int]) -> Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq], device=next(model.parameters()).device))[0].float()


def assert_close(got: Tensor, expected: Tensor, atol: float, what: str) -> None:
    diff = (got.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"{what}: max |cached - full| = {diff:.3g} > {atol}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_prefill_then_decode_equals_full_forward(case: str, device: str) -> None:
    model = make_model(case, device=device)
    vocab = model.config.vocab_size
    for seed in range(8):
        rng = random.Random(seed)
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        new = 8
        ref = model.generate(torch.tensor([prompt], device=device), new)[0].tolist()
        full = full_logits(model, ref)
        cache, alloc = make_cache(model, seed=seed), SlotAllocator(seed)
        slots = alloc.take(len(ref))
        seq = list(prompt)
        row = Row(list(prompt), 0, slots)
        with torch.no_grad():
            for step in range(new):
                tokens, positions, batch = build_step([[row]], alloc.pad_slot, device)
                logits = model(tokens, positions, cache, batch)
                assert_close(logits, full[row.start : row.end], 1e-4, f"seed {seed} step {step}")
                seq.append(int(logits[-1].argmax()))
                row = Row([seq[-1]], len(seq) - 1, slots)
        assert seq == ref, f"seed {seed}: cached greedy tokens differ from Transformer.generate"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_batched_decode_of_different_lengths_equals_full_forward(case: str, device: str) -> None:
    model = make_model(case, seed=1, device=device)
    vocab = model.config.vocab_size
    for seed in range(4):
        rng = random.Random(100 + seed)
        lengths = [1, rng.randint(2, 8), rng.randint(9, 30), rng.randint(2, 30)]
        rng.shuffle(lengths)
        seqs = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
        new = 6
        refs = [model.generate(torch.tensor([s], device=device), new)[0].tolist() for s in seqs]
        fulls = [full_logits(model, r) for r in refs]
        cache, alloc = make_cache(model, seed=seed), SlotAllocator(seed)
        tables = [alloc.take(len(r)) for r in refs]
        with torch.no_grad():
            # One step prefills every prompt: one group per sequence, logits for the last tokens only.
            rows = [Row(list(s), 0, t) for s, t in zip(seqs, tables, strict=True)]
            tokens, positions, batch = build_step([[r] for r in rows], alloc.pad_slot, device)
            last = torch.tensor(lengths, device=device).cumsum(0) - 1
            logits = model(tokens, positions, cache, batch, logits_indices=last)
            for _ in range(new):
                for b, s in enumerate(seqs):
                    assert_close(
                        logits[b], fulls[b][len(s) - 1], 1e-4, f"seed {seed} row {b} pos {len(s) - 1}"
                    )
                    s.append(int(logits[b].argmax()))
                # All sequences decode together: one group, rows=B, q_len=1, padded read slots.
                rows = [Row([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables, strict=True)]
                tokens, positions, batch = build_step([rows], alloc.pad_slot, device)
                assert batch.groups[0].rows == len(rows) and batch.groups[0].q_len == 1
                logits = model(tokens, positions, cache, batch)
        assert seqs == refs, f"seed {seed}: batched greedy tokens differ from Transformer.generate"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_chunked_prefill_equals_full_forward(case: str, device: str) -> None:
    model = make_model(case, seed=2, device=device)
    vocab = model.config.vocab_size
    for seed in range(8):
        rng = random.Random(200 + seed)
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(6, 40))]
        cuts = sorted(rng.sample(range(1, len(prompt)), rng.choice([1, 2])))
        bounds = [0, *cuts, len(prompt)]
        new = 4
        ref = model.generate(torch.tensor([prompt], device=device), new)[0].tolist()
        full = full_logits(model, ref)
        cache, alloc = make_cache(model, seed=seed), SlotAllocator(seed)
        slots = alloc.take(len(ref))
        seq = list(prompt)
        with torch.no_grad():
            for s, e in zip(bounds, bounds[1:], strict=False):
                tokens, positions, batch = build_step([[Row(prompt[s:e], s, slots)]], alloc.pad_slot, device)
                assert batch.groups[0].kv_len == e
                logits = model(tokens, positions, cache, batch)
                assert_close(logits, full[s:e], 1e-4, f"seed {seed} chunk {s}:{e}")
            for step in range(new):
                seq.append(int(logits[-1].argmax()))
                if step < new - 1:
                    row = Row([seq[-1]], len(seq) - 1, slots)
                    tokens, positions, batch = build_step([[row]], alloc.pad_slot, device)
                    logits = model(tokens, positions, cache, batch)
                    assert_close(logits, full[len(seq) - 1 : len(seq)], 1e-4, f"seed {seed} decode {step}")
        assert seq == ref, f"seed {seed}: greedy tokens after chunked prefill differ"


def test_mixed_step_decodes_chunks_and_multi_row_chunks_together() -> None:
    """One forward carrying a decode group, a single prefill chunk and a 2-row group with q_len 3."""
    model = make_model("gqa", seed=3)
    vocab = model.config.vocab_size
    rng = random.Random(3)
    seqs = [[rng.randrange(vocab) for _ in range(n)] for n in (12, 5, 20, 9, 14)]
    fulls = [full_logits(model, s) for s in seqs]
    cache, alloc = make_cache(model, seed=3), SlotAllocator(3)
    tables = [alloc.take(len(s)) for s in seqs]
    with torch.no_grad():
        # Step 1: everything but the last tokens (of 0, 1), and of 3 tokens (of 2, 3) and 6 (of 4).
        done = [len(seqs[0]) - 1, len(seqs[1]) - 1, len(seqs[2]) - 3, len(seqs[3]) - 3, len(seqs[4]) - 6]
        groups = [[Row(seqs[i][: done[i]], 0, tables[i])] for i in range(5)]
        tokens, positions, batch = build_step(groups, alloc.pad_slot)
        model(tokens, positions, cache, batch)
        # Step 2, one flat batch: decode (rows 0, 1), a 2-row chunk group (rows 2, 3) and a chunk (4).
        decode = [Row(seqs[i][done[i] :], done[i], tables[i]) for i in (0, 1)]
        chunks = [Row(seqs[i][done[i] :], done[i], tables[i]) for i in (2, 3)]
        tail = [Row(seqs[4][done[4] :], done[4], tables[4])]
        tokens, positions, batch = build_step([decode, chunks, tail], alloc.pad_slot)
        assert [(g.rows, g.q_len) for g in batch.groups] == [(2, 1), (2, 3), (1, 6)]
        logits = model(tokens, positions, cache, batch)
    expected = torch.cat([fulls[i][done[i] :] for i in range(5)])
    assert_close(logits, expected, 1e-4, "mixed step")


@pytest.mark.parametrize("device", DEVICES)
def test_float32_and_bfloat16_both_run(device: str) -> None:
    ref_model = make_model("gqa", seed=4)
    ids = prompts(ref_model.config.vocab_size, batch=3, length=20, seed=4)
    with torch.no_grad():
        ref = ref_model(ids)
    scale = ref.abs().max().item()
    for dtype, rel_tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.05)):
        model = make_model("gqa", seed=4, device=device, dtype=dtype)
        with torch.no_grad():
            logits = model(ids.to(device))
        assert logits.dtype == dtype and logits.device.type == device
        assert torch.isfinite(logits).all()
        diff = (logits.float().cpu() - ref).abs().max().item()
        assert diff <= rel_tol * scale, f"{dtype}: max diff {diff:.3g} vs float32 (logit scale {scale:.3g})"
        # The cached path runs in this dtype too: a prefill of the first prompt, then one decode.
        cache, alloc = make_cache(model, seed=4), SlotAllocator(4)
        slots = alloc.take(ids.shape[1])
        prompt = ids[0].tolist()
        with torch.no_grad():
            tokens, positions, batch = build_step([[Row(prompt[:-1], 0, slots)]], alloc.pad_slot, device)
            model(tokens, positions, cache, batch)
            tokens, positions, batch = build_step(
                [[Row(prompt[-1:], len(prompt) - 1, slots)]], alloc.pad_slot, device
            )
            cached = model(tokens, positions, cache, batch)
        assert cached.dtype == dtype and torch.isfinite(cached).all()
        diff = (cached[0].float().cpu() - ref[0, -1]).abs().max().item()
        assert diff <= rel_tol * scale, f"{dtype}: cached decode differs from float32 by {diff:.3g}"


def test_logits_indices_select_rows() -> None:
    model = make_model("gqa", seed=5)
    ids = prompts(model.config.vocab_size, batch=1, length=10, seed=5)[0]
    cache, alloc = make_cache(model), SlotAllocator(5)
    slots = alloc.take(10)
    tokens, positions, batch = build_step([[Row(ids.tolist(), 0, slots)]], alloc.pad_slot)
    with torch.no_grad():
        picked = model(tokens, positions, cache, batch, logits_indices=torch.tensor([9, 3]))
    full = full_logits(model, ids.tolist())
    assert picked.shape == (2, model.config.vocab_size)
    assert_close(picked, full[[9, 3]], 1e-4, "logits_indices")


@pytest.mark.parametrize("rows", [0, 1, 3, 8, 9, 64, 65])  # 65: past the row-by-row walk (at::linear)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("in_features", "out_features", "bias"), [(48, 71, False), (53, 64, True)])
def test_serving_linear_equals_f_linear(
    rows: int, dtype: torch.dtype, in_features: int, out_features: int, bias: bool
) -> None:
    """71 outputs: the walk's last two-row unit and the packed layout's last group are partial; 53 inputs:
    a partial 16-block (and an odd count, which the packed layout does not take)."""
    load_cpu_kernels()  # without a compiler the op's plain body serves, and this still holds
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    with torch.no_grad():
        b = None if linear.bias is None else linear.bias.float()
        want = F.linear(x.float(), linear.weight.float(), b)
        got = ServingLinear(linear)(x)
    assert got.shape == (rows, out_features) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "weights", ["float32", "bfloat16", "int8", "float32-packed", "bfloat16-packed", "int8-packed"]
)
def test_serving_linear_rows_do_not_depend_on_their_batch_or_threads(weights: str) -> None:
    """A row's projection is bit for bit the same alone, in any batch the kernel serves, and with any
    number of threads: what shares a step cannot change a sequence's tokens. The packed layout serves
    prefill chunks too, so its rows agree at every count."""
    if not load_cpu_kernels():
        pytest.skip("the CPU kernels could not be built here")
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if weights.startswith("float32") else torch.bfloat16
    # 232 features: 16-blocks, 64-blocks, a 32-block (the bfloat16 dot-product path's) and a tail.
    # 1,031 outputs: a summation order that differs by tile flips a few of 66k bfloat16 roundings (at
    # 131 outputs, such a change to the bfloat16 path went unseen); the last packed group is partial.
    weight = torch.randn(1031, 232, generator=gen)
    x = torch.randn(300, 232, generator=gen).to(dtype)
    counts = (2, 5, 8, 33, 64)
    if weights == "int8":
        qweight, scales = quantize_rows(weight)
        project = lambda rows: torch.ops.tinyserve.linear_int8(rows, qweight, scales, None)  # noqa: E731
    elif weights.endswith("-packed"):
        qweight, scales = quantize_rows(weight)
        int8 = weights == "int8-packed"
        packed = torch.ops.tinyserve.pack_linear(qweight if int8 else weight.to(dtype), pairs=True)
        if not packed.numel():
            pytest.skip(
                f"this CPU gets no packed {weights} weights (needs AVX-512; AVX512-BF16 for bfloat16)"
            )
        scaled = scales if int8 else None
        project = lambda rows: torch.ops.tinyserve.packed_linear(rows, packed, scaled, None, 1031)  # noqa: E731
        counts += (65, 300)
    else:
        project = lambda rows: torch.ops.tinyserve.linear(rows, weight.to(dtype), None)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([project(x[i : i + 1]) for i in range(max(counts))])
        torch.set_num_threads(2)
        for rows in counts:
            assert torch.equal(project(x[:rows]), alone[:rows]), rows
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_serving_linear_packs_weights_where_the_cpu_has_the_instructions(dtype: torch.dtype) -> None:
    """The packed copy replaces the weight (no second copy is kept) and unpacks to it exactly."""
    capable = "avx512" in torch.backends.cpu.get_cpu_capability().lower()
    if dtype == torch.bfloat16:
        capable = native_bfloat16(torch.device("cpu"))
    if not (load_cpu_kernels() and capable):
        pytest.skip(f"needs the CPU kernels and packed {dtype} weights (AVX-512; AVX512-BF16 for bfloat16)")
    linear = nn.Linear(96, 130).to(dtype)
    serving = ServingLinear(linear)
    assert serving.weight is None and serving.packed is not None
    assert torch.equal(unpack(serving.packed, 130), linear.weight)
    if dtype == torch.bfloat16:  # an odd feature count has no bfloat16 pairs: the row walk serves
        odd = ServingLinear(nn.Linear(53, 8).to(dtype))
        assert odd.packed is None and odd.weight is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_serving_linears_keep_logits_and_a_zero_row_step(dtype: torch.dtype) -> None:
    """In bfloat16 the LM head may run on a packed copy of a tied embedding, which still embeds; the
    projections' biases are added."""
    model = make_model("mha_bias").to(dtype)
    assert model.config.tie_word_embeddings
    serving = copy.deepcopy(model)
    load_cpu_kernels()
    serving.use_serving_linears()
    assert torch.equal(serving.embed_tokens.weight, model.embed_tokens.weight)
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        assert torch.allclose(model(tokens).float(), serving(tokens).float(), atol=tol, rtol=tol)
        # A serving step that only advances a prefill chunk asks for logits of no row at all.
        assert serving(tokens, logits_indices=tokens[:0, 0]).shape == (0, 17, model.config.vocab_size)
