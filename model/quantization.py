"""Weight-only int8: one byte per weight, a float32 scale per output row (symmetric absmax).

At a few rows a decode step is a read of every weight, so int8 halves bfloat16's bytes per step.
Activations stay in the model's dtype; products accumulate in float32 and each output is scaled by
its row's scale. On the CPU, `model/csrc/small_linear.cpp` serves the products straight from the int8
bytes (no de-quantized copy of the weight): `tinyserve::packed_linear` on the rows packed for AVX-512
where the CPU has it, else `tinyserve::linear_int8`, whose plain body elsewhere is
`torch._weight_int8pack_mm`, which does the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.dtypes import QUANTIZATIONS

torch.library.define(
    "tinyserve::linear_int8", "(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor"
)


def plain_int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """The op's body where our kernel is not built: PyTorch's own int8-weight matmul, in float32
    (its bfloat16 variant crashes in torch 2.13 when the features are not a multiple of its width)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    y = torch._weight_int8pack_mm(flat, qweight, scales.float()).view(*x.shape[:-1], qweight.shape[0])
    return (y if bias is None else y + bias.float()).to(x.dtype)


torch.library.impl("tinyserve::linear_int8", "CompositeExplicitAutograd")(plain_int8_linear)


@torch.library.register_fake("tinyserve::linear_int8")
def _(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weight [N, K] and float32 scales [N] with weight ~= qweight * scales[:, None].

    Each row's largest magnitude maps to 127; an all-zero row gets scale 1 (and zeros).
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    qweight = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return qweight, scales


def dequantize_rows(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (qweight.float() * scales[:, None]).to(dtype)


class Int8Linear(nn.Module):
    """An inference-only Linear whose weight is int8 rows with a scale each."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features = qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("packed", None)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        qweight, scales = quantize_rows(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qweight, scales, bias)

    def pack(self, keep_rows: bool, activations: torch.dtype) -> bool:
        """Serving: the int8 rows in our CPU kernel's packed layout (model/linear.py) for `activations`,
        where it has one. The rows themselves go, unless `keep_rows` (a tied embedding reads them).
        Returns whether packed."""
        pairs = activations == torch.bfloat16
        packed = torch.ops.tinyserve.pack_linear(self.qweight, pairs)
        if not packed.numel():
            return False
        self.packed = packed
        if not keep_rows:
            self.qweight = None
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return torch.ops.tinyserve.packed_linear(
                x, self.packed, self.scales, self.bias, self.out_features
            )
        return torch.ops.tinyserve.linear_int8(x, self.qweight, self.scales, self.bias)


class Int8Embedding(nn.Module):
    """Token embeddings read from an int8 LM head's rows: a tied model keeps one int8 copy."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = head
        self.dtype = dtype

    def forward(self, tokens: Tensor) -> Tensor:
        rows = F.embedding(tokens, self.head.qweight).to(self.dtype)
        return rows * self.head.scales[tokens].unsqueeze(-1).to(self.dtype)


def check_quantization(method: str, device: torch.device) -> None:
    """Refuse, with one line, a method we do not have or a device its kernel does not run on."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    if device.type != "cpu":
        raise ValueError(
            f"--quantization {method} runs on the CPU only (its kernel reads int8 weights there); "
            f"serve on {device.type} without it, or with --device cpu"
        )
