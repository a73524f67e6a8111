"""The paged decode-attention op: write the step's keys and values, attend over the cache in place.

One new token per row. `tinyserve::paged_decode_attention` is an op of our own (`torch.library`), so a
compiled decode step sees one opaque call per layer whose output shape depends only on the batch: the graph
does not change when sequences grow. Its bodies:
- CPU: a C++ kernel (`csrc/paged_attention.cpp`, see `model/kernels.py`) that reads keys and values
  from their pages, with no gather copy and no mask;
- elsewhere, or where no compiler is at hand: `reference_decode`, a gather over the whole block-table
  width and SDPA under a length mask. Static shapes, so CUDA graphs can capture it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    block_size: int,
    scale: float,
) -> Tensor:
    """Decode attention by gathering each row's whole block-table width, masked to its length."""
    rows, heads, dim = q.shape
    width = block_tables.shape[1] * block_size
    pos = torch.arange(width, device=q.device)
    slots = block_tables.long()[:, pos // block_size] * block_size + pos % block_size
    # A padded row (length 0) sees its first slot only, so its output stays finite; nobody reads it.
    visible = (pos[None, :] < seq_lens[:, None]) | (pos[None, :] == 0)
    # Hidden positions read the null block's zeros, not stale slots: a masked score still multiplies
    # its value, and 0 * NaN is NaN.
    slots = torch.where(visible, slots, 0)
    kv_heads = k_cache.shape[1]
    keys = k_cache[slots].transpose(1, 2)  # [rows, kv_heads, width, dim]
    values = v_cache[slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        keys,
        values,
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=heads != kv_heads,
    )
    return out.view(rows, heads, dim)


torch.library.define(
    "tinyserve::paged_decode_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
    "Tensor block_tables, Tensor seq_lens, int block_size, float scale) -> Tensor",
)


@torch.library.impl("tinyserve::paged_decode_attention", "CompositeExplicitAutograd")
def _reference_body(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    block_size: int,
    scale: float,
) -> Tensor:
    """Every device's body, unless a kernel for it is loaded (the C++ one registers for the CPU)."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)
    return reference_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale)


@torch.library.register_fake("tinyserve::paged_decode_attention")
def _(q: Tensor, *args: object) -> Tensor:
    return q.new_empty(q.shape)  # contiguous, as every body returns it, whatever q's strides


paged_decode_attention = torch.ops.tinyserve.paged_decode_attention
"""(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, block_size, scale) -> out.

Writes k/v [rows, kv_heads, dim] to `slot_mapping`, then attends q [rows, heads, dim] over the cache.
`block_tables` [rows, width] and `seq_lens` [rows] are int32; a row of length 0 is padding.
"""
