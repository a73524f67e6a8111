"""The serving model's projections, as ops our CPU kernels can serve (`model/csrc/small_linear.cpp`).

- `tinyserve::packed_linear`: on a CPU with AVX-512, float32 weights, and bfloat16 ones where it also
  multiplies bfloat16 (AVX512-BF16; AMX CPUs have it too), are packed once, at load, into the layout its
  multiply-add instructions want (`tinyserve::pack_linear`), and every product, decode step or prefill
  chunk, runs on them.
- `tinyserve::linear` otherwise: the weight streamed once for a few rows (the decode step), read as
  stored (bfloat16 without bfloat16 arithmetic too); larger batches go to at::linear.
Elsewhere both ops are `F.linear`. Training never uses them (they have no backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

torch.library.define("tinyserve::linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
torch.library.define("tinyserve::pack_linear", "(Tensor weight, bool pairs=False) -> Tensor")
torch.library.define(
    "tinyserve::packed_linear",
    "(Tensor x, Tensor packed, Tensor? scales, Tensor? bias, int out_features) -> Tensor",
)


@torch.library.impl("tinyserve::linear", "CompositeExplicitAutograd")
def _plain_body(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


@torch.library.register_fake("tinyserve::linear")
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.impl("tinyserve::pack_linear", "CompositeExplicitAutograd")
def _no_packing(weight: Tensor, pairs: bool = False) -> Tensor:
    """Only the CPU kernel has a packed layout; elsewhere nothing is packed."""
    return weight.new_empty(0)


def unpack(packed: Tensor, out_features: int) -> Tensor:
    """The [out_features, in_features] weight back from the kernel's layout: [groups][in / step][group][step]
    (a step is a pair of features where the input is bfloat16, else one)."""
    groups, steps, group, step = packed.shape
    return packed.permute(0, 2, 1, 3).reshape(groups * group, steps * step)[:out_features]


@torch.library.impl("tinyserve::packed_linear", "CompositeExplicitAutograd")
def _packed_plain_body(
    x: Tensor, packed: Tensor, scales: Tensor | None, bias: Tensor | None, out_features: int
) -> Tensor:
    weight = unpack(packed, out_features)
    if scales is not None:  # int8 rows, each times its scale
        return F.linear(
            x.float(), weight.float() * scales[:, None], None if bias is None else bias.float()
        ).to(x.dtype)
    return F.linear(x, weight, bias)


@torch.library.register_fake("tinyserve::packed_linear")
def _(x: Tensor, packed: Tensor, scales: Tensor | None, bias: Tensor | None, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class ServingLinear(nn.Module):
    """An inference-only Linear: on the kernel's packed copy of the weight where it has one (the
    original is then dropped, unless a tied embedding still holds it), else on the same weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.bias = linear.bias
        packed = torch.ops.tinyserve.pack_linear(linear.weight.detach())
        self.packed = nn.Parameter(packed, requires_grad=False) if packed.numel() else None
        self.weight = None if self.packed is not None else linear.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return torch.ops.tinyserve.packed_linear(x, self.packed, None, self.bias, self.out_features)
        return torch.ops.tinyserve.linear(x, self.weight, self.bias)
