"""Weight-only int8: the round trip per row, the kernel against its de-quantized float linear, and a
quantized model against the same model holding the de-quantized weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import load_cpu_kernels
from model.quantization import (
    Int8Embedding,
    Int8Linear,
    check_quantization,
    dequantize_rows,
    plain_int8_linear,
    quantize_rows,
)
from model.transformer import Transformer
from tests.model.model_helpers import one_thread  # noqa: F401 (fixture)
from tests.model.test_transformer import make_model


def test_round_trip_error_is_within_half_a_step_per_row() -> None:
    gen = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes, a zero row and a row with one outlier: each gets its own scale.
    w = torch.randn(6, 37, generator=gen) * torch.tensor([[1e-3], [1.0], [50.0], [0.0], [1.0], [1.0]])
    w[4, 5] = 300.0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6,)
    assert q.abs().max() <= 127
    assert torch.equal(q.abs().amax(dim=1)[[0, 1, 2, 4, 5]], torch.full((5,), 127, dtype=torch.int8))
    error = (dequantize_rows(q, s) - w).abs()
    assert torch.all(error <= s[:, None] / 2 + 1e-7)
    assert torch.equal(dequantize_rows(q, s)[3], torch.zeros(37))  # the zero row stays exactly zero
    assert torch.allclose(s, w.abs().amax(dim=1).clamp_min(1e-30) / 127) or s[3] == 1.0


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 3, 9, 32, 33])  # x holds 2 x rows: 33 is past the kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "bias"), [((71, 48), False), ((64, 67), True), ((3000, 40), False)])
def test_int8_linear_equals_its_dequantized_float_linear(
    packed: bool, rows: int, dtype: torch.dtype, shape: tuple[int, int], bias: bool
) -> None:
    """Odd shapes: an odd number of output rows (the kernel's last two-row unit and last packed group
    are partial), features not a multiple of the SIMD width, and more rows than one tile of the
    large-batch path."""
    load_cpu_kernels()  # without a compiler the plain body serves: the same numbers, more slowly
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(shape[1], shape[0], bias=bias).to(dtype)
    x = torch.randn(2, rows, shape[1], generator=gen).to(dtype)
    layer = Int8Linear.from_linear(linear)
    qweight, scales = layer.qweight, layer.scales
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float32
    if packed:
        if not layer.pack(keep_rows=False, activations=dtype):
            pytest.skip("this CPU gets no packed int8 weights (needs AVX-512)")
        assert layer.qweight is None  # the packed rows replace them
    with torch.no_grad():
        b = None if layer.bias is None else layer.bias.float()
        want = F.linear(x.float(), dequantize_rows(qweight, scales), b)
        got = layer(x)
        plain = plain_int8_linear(x, qweight, scales, layer.bias)
    assert got.shape == (2, rows, shape[0]) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)
    assert torch.allclose(plain.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_kernel_keeps_a_non_finite_input_in_its_own_row(packed: bool, bad: float) -> None:
    """A NaN or an infinity in one input row makes that row's outputs non-finite, as float arithmetic
    would, and leaves the other rows as they are alone: the sampler fails that row's request only."""
    if not load_cpu_kernels():
        pytest.skip("the CPU kernels could not be built here")
    gen = torch.Generator().manual_seed(1)
    layer = Int8Linear(*quantize_rows(torch.randn(70, 300, generator=gen)), None)
    if packed and not layer.pack(keep_rows=False, activations=torch.bfloat16):
        pytest.skip("this CPU gets no packed int8 weights (needs AVX-512)")
    x = torch.randn(3, 300, generator=gen).to(torch.bfloat16)
    alone = [layer(x[i : i + 1]) for i in (0, 2)]
    x[1, 200] = bad
    got = layer(x)
    assert not got[1].isfinite().any()
    assert torch.equal(got[0:1], alone[0]) and torch.equal(got[2:3], alone[1])


def dequantized_twin(model: Transformer) -> Transformer:
    """The float model whose weights are exactly what the int8 copy of `model` represents."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for owner, name in twin._projections():
            layer = getattr(owner, name)
            layer.weight.copy_(dequantize_rows(*quantize_rows(layer.weight)))
    return twin


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", ["gqa", "mha_bias"])  # mha_bias: tied embeddings and biases
def test_quantized_model_equals_the_float_model_of_its_dequantized_weights(case: str) -> None:
    load_cpu_kernels()
    model = make_model(case)
    twin = dequantized_twin(model)
    model.quantize_int8()
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.embed_tokens, Int8Embedding) == model.config.tie_word_embeddings
    if model.config.tie_word_embeddings:  # one int8 copy: the embedding reads the head's rows
        assert model.embed_tokens.head is model.lm_head
    tokens = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(tokens), twin(tokens), atol=1e-4, rtol=1e-4)
    float_bytes = sum(p.numel() * 4 for p in {id(p): p for p in twin.parameters()}.values())
    assert model.weight_bytes() < 0.5 * float_bytes


def test_unknown_method_or_device_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="--quantization must be one of int8, got 'int4'"):
        check_quantization("int4", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on the CPU only"):
        check_quantization("int8", torch.device("cuda"))
    check_quantization("int8", torch.device("cpu"))
