"""`tinyserve::linear`: the serving model's projections, as an op our CPU kernel can serve.

On the CPU, `model/csrc/small_linear.cpp` streams the weight once for a few rows (the decode step),
reading bfloat16 weights without bfloat16 arithmetic; larger batches go to at::linear. Elsewhere the
op is `F.linear`. Training never uses it (it has no backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

torch.library.define("tinyserve::linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


@torch.library.impl("tinyserve::linear", "CompositeExplicitAutograd")
def _plain_body(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


@torch.library.register_fake("tinyserve::linear")
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class ServingLinear(nn.Module):
    """An inference-only Linear that runs `tinyserve::linear` on the same (possibly tied) weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.tinyserve.linear(x, self.weight, self.bias)
