"""The paged decode-attention op: write the step's keys and values, attend over the cache in place.

One new token per row. `tinyserve::paged_decode_attention` is a `torch.library.custom_op`, so a compiled
decode step sees one opaque call per layer whose output shape depends only on the batch: the graph does
not change when sequences grow. Its bodies:
- CPU: a small C++ kernel (`paged_attention.cpp`, built at first use for this machine) that reads keys
  and values from their pages, with no gather copy and no mask;
- elsewhere, or where no compiler is at hand: `reference_decode`, a gather over the whole block-table
  width and SDPA under a length mask. Static shapes, so CUDA graphs can capture it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("model.attention")

_KERNEL_SOURCE = Path(__file__).with_name("paged_attention.cpp")
_kernel_lock = threading.Lock()
_kernel_state: dict[str, bool] = {}


def load_cpu_kernel() -> bool:
    """Build (once per machine; cached under torch's extensions folder) and load the CPU kernel.

    Returns False, with one log line saying why, when it cannot be built (no C++ compiler):
    the op then runs `reference_decode`, which is slower but gives the same results.
    """
    with _kernel_lock:
        if "loaded" not in _kernel_state:
            try:
                from torch.utils.cpp_extension import load

                load(
                    name="tinyserve_paged_attention",
                    sources=[str(_KERNEL_SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                    is_python_module=False,
                    verbose=False,
                )
                _kernel_state["loaded"] = True
            except Exception as exc:  # no compiler, no headers: fall back, and say so once
                log.warning("paged attention: C++ kernel unavailable (%s); using the reference body", exc)
                _kernel_state["loaded"] = False
        return _kernel_state["loaded"]


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
    kv_heads = k_cache.shape[1]
    keys = k_cache[slots].transpose(1, 2)  # [rows, kv_heads, width, dim]
    values = v_cache[slots].transpose(1, 2)
    # A padded row (length 0) sees its first slot only, so its output stays finite; nobody reads it.
    visible = (pos[None, :] < seq_lens[:, None]) | (pos[None, :] == 0)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        keys,
        values,
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=heads != kv_heads,
    )
    return out.view(rows, heads, dim)


@torch.library.custom_op("tinyserve::paged_decode_attention", mutates_args=("k_cache", "v_cache"))
def paged_decode_attention(
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
    """Write k/v [rows, kv_heads, dim] to `slot_mapping`, then attend q [rows, heads, dim] over the cache.

    `block_tables` [rows, width] and `seq_lens` [rows] are int32; a row of length 0 is padding.
    """
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)
    if q.device.type == "cpu" and _kernel_state.get("loaded"):
        return torch.ops.tinyserve_cpu.paged_decode(
            q.contiguous(), k_cache, v_cache, block_tables, seq_lens, block_size, scale
        )
    return reference_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale)


@paged_decode_attention.register_fake
def _(
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
    return torch.empty_like(q)
