"""A Llama-family decoder in plain PyTorch, readable top to bottom.

Two ways in:
- training and reference use: `model(tokens[B, T])` runs causal attention over the batch, no cache;
- serving: `model(tokens[N], positions[N], cache, batch)` runs a flat batch of new tokens from many
  sequences (prefill chunks and one-token decodes together). Every linear layer sees all N tokens
  at once; only attention is done per `AttentionGroup`, reading keys and values from a cache that
  is addressed by flat slot index. How slots are allocated (pages, prefixes) is the engine's
  business; the model only writes to `batch.write_slots` and reads `group.read_slots`.

q/k/v and gate/up projections are fused into one matrix each (fewer, larger matmuls per step);
`model/checkpoint.py` splits and joins them so the files keep Hugging Face's tensor names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.activations import ACTIVATIONS
from model.attention import paged_decode_attention
from model.config import ModelConfig
from model.linear import ServingLinear
from model.quantization import Int8Embedding, Int8Linear


@dataclass
class AttentionGroup:
    """`rows` sequences with `q_len` new tokens each, stored contiguously in the flat batch.

    Keys are read from cache slots `read_slots` ([rows * kv_len], in position order, padded with a
    slot holding finite values); `mask` ([rows, 1, q_len, kv_len]) hides padding
    and the future; boolean (True = may attend) or additive float.
    """

    start: int
    rows: int
    q_len: int
    kv_len: int
    read_slots: Tensor
    mask: Tensor

    @property
    def num_tokens(self) -> int:
        return self.rows * self.q_len


@dataclass
class DecodeRows:
    """The first `rows` tokens of the batch: one new token per sequence, attending over the paged cache
    in place (`model/attention.py`). The decode fast path is a batch of these alone."""

    slot_mapping: Tensor
    """[rows] the cache slot each new token's keys and values go to (padding rows: a sink slot)."""
    block_tables: Tensor
    """[rows, width] int32: each sequence's cache blocks."""
    seq_lens: Tensor
    """[rows] int32: tokens each row attends to, its new one included; 0 for a padding row."""
    block_size: int

    @property
    def rows(self) -> int:
        return self.slot_mapping.shape[0]


@dataclass
class CacheBatch:
    """How the flat batch of new tokens meets the cache: where their K/V go and who reads what.

    Decode rows (if any) come first; prefill chunks follow as `groups`, whose keys and values are
    written to `write_slots` and read back through `read_slots`.
    """

    write_slots: Tensor
    groups: list[AttentionGroup]
    decode: DecodeRows | None = None


KVCache = list[tuple[Tensor, Tensor]]
"""Per layer, (keys, values) of shape [num_slots, num_key_value_heads, head_dim]."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.shape = (dim,)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        # Normalize in float32 and cast back before the weight, as transformers does: logits match.
        return self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


def rope_frequencies(config: ModelConfig) -> tuple[Tensor, float]:
    """Rotary inverse frequencies and the factor on cos/sin (yarn's attention scaling; 1 otherwise),
    computed with transformers' formulas and operation order, so angles match to the bit."""
    dim = config.head_dim
    base = config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = 1.0 / base
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    old_context = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif kind == "yarn":
        return _yarn_frequencies(config, base, scaling, old_context)
    return inv_freq, 1.0


def _yarn_frequencies(
    config: ModelConfig, base: Tensor, scaling: dict, old_context: int
) -> tuple[Tensor, float]:
    """YaRN: low frequencies interpolated by `factor`, high ones kept, a linear ramp between, and
    cos/sin scaled by an attention factor (0.1 * ln(factor) + 1 unless given)."""
    dim = config.head_dim
    factor = scaling.get("factor") or config.max_position_embeddings / old_context

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        weight, weight_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        both = weight and weight_all
        attention = mscale(factor, weight) / mscale(factor, weight_all) if both else mscale(factor)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over old_context
        return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    inv_freq = 1.0 / (factor * base) * (1 - keep) + 1.0 / base * keep
    return inv_freq, float(attention)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x[..., heads, head_dim] by per-token angles cos/sin[..., 1, head_dim] (HF's layout)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split), bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values [..., heads, head_dim], rotated to their positions."""
        qkv = self.qkv_proj(x)
        qk_size = self.split[0] + self.split[1]
        # q and k sit side by side in the fused output: one rotation serves both.
        qk = apply_rotary(qkv[..., :qk_size].unflatten(-1, (-1, self.head_dim)), cos, sin)
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=-2)
        return q, k, qkv[..., qk_size:].unflatten(-1, (self.n_kv_heads, self.head_dim))

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layer_cache: tuple[Tensor, Tensor] | None,
        batch: CacheBatch | None,
    ) -> Tensor:
        """Attention output [..., heads, head_dim]: causal over the batch, or over the cache."""
        if layer_cache is None:
            return F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=True,
                enable_gqa=self.n_heads != self.n_kv_heads,
            ).transpose(1, 2)
        assert batch is not None
        return self._attend_cached(q, k, v, layer_cache, batch)

    def _attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, layer_cache: tuple[Tensor, Tensor], batch: CacheBatch
    ) -> Tensor:
        k_cache, v_cache = layer_cache
        outs = []
        d = batch.decode
        if d is not None:
            n = d.rows
            outs.append(
                paged_decode_attention(
                    q[:n],
                    k[:n],
                    v[:n],
                    k_cache,
                    v_cache,
                    d.slot_mapping,
                    d.block_tables,
                    d.seq_lens,
                    d.block_size,
                    self.head_dim**-0.5,
                )  # fmt: skip
            )
            if not batch.groups:
                return outs[0]
            k, v = k[n:], v[n:]
        k_cache.index_copy_(0, batch.write_slots, k)
        v_cache.index_copy_(0, batch.write_slots, v)
        for g in batch.groups:
            qg = q[g.start : g.start + g.num_tokens].view(g.rows, g.q_len, self.n_heads, self.head_dim)
            kg = k_cache.index_select(0, g.read_slots).view(g.rows, g.kv_len, self.n_kv_heads, self.head_dim)
            vg = v_cache.index_select(0, g.read_slots).view(g.rows, g.kv_len, self.n_kv_heads, self.head_dim)
            og = F.scaled_dot_product_attention(
                qg.transpose(1, 2),
                kg.transpose(1, 2),
                vg.transpose(1, 2),
                attn_mask=g.mask,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )
            outs.append(og.transpose(1, 2).reshape(g.num_tokens, self.n_heads, self.head_dim))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout that costs nothing when serving (an eval-mode nn.Dropout is still a call per use).

    Training drops the embedding and each residual branch, not attention probabilities: on the CPU
    those leave the flash kernel for the materialized path, which made a compiled step 1.6x slower.
    """
    return F.dropout(x, p, training=True) if training and p > 0 else x


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.dropout = dropout

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        layer_cache: tuple[Tensor, Tensor] | None,
        batch: CacheBatch | None,
    ) -> Tensor:
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        attn = self.self_attn.attend(q, k, v, layer_cache, batch)
        x = x + _dropout(self.self_attn.o_proj(attn.flatten(-2)), self.dropout, self.training)
        return x + _dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, dropout) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.dropout = dropout
        inv_freq, scale = rope_frequencies(config)
        angles = torch.outer(torch.arange(config.max_position_embeddings).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos() * scale, persistent=False)
        self.register_buffer("rope_sin", angles.sin() * scale, persistent=False)

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = 0.02 / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (weights may be stored otherwise, e.g. int8)."""
        return self.norm.weight.dtype

    def weight_bytes(self) -> int:
        """Bytes of the weights as stored (tied tensors once), quantized ones included."""
        weights = [*self.parameters(), *(b for n, b in self.named_buffers() if not n.startswith("rope_"))]
        return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in weights}.values())

    def _projections(self) -> list[tuple[nn.Module, str]]:
        """Every linear layer as (owner, attribute): the layers' projections, then the LM head."""
        slots: list[tuple[nn.Module, str]] = []
        for block in self.layers:
            slots += [(block.self_attn, "qkv_proj"), (block.self_attn, "o_proj")]
            slots += [(block.mlp, "gate_up_proj"), (block.mlp, "down_proj")]
        return [*slots, (self, "lm_head")]

    def use_serving_linears(self) -> bool:
        """Serving only: every float projection and the LM head run our kernels' ops (model/linear.py).

        Returns whether they run on weights packed for the CPU's AVX-512 instructions.
        """
        packed = False
        for owner, name in self._projections():
            layer = getattr(owner, name)
            if isinstance(layer, nn.Linear):
                serving = ServingLinear(layer)
                setattr(owner, name, serving)
                packed |= serving.packed is not None
            elif isinstance(layer, Int8Linear):
                embedding = self.embed_tokens
                tied = isinstance(embedding, Int8Embedding) and embedding.head is layer
                packed |= layer.pack(keep_rows=tied, activations=self.dtype)
        return packed

    def quantize_int8(self) -> None:
        """Serving only: every linear layer's weight becomes int8 rows with a scale each.

        A tied embedding reads its rows from the quantized LM head, so one int8 copy serves both.
        """
        tied = self.config.tie_word_embeddings
        for owner, name in self._projections():
            setattr(owner, name, Int8Linear.from_linear(getattr(owner, name)))
        if tied:
            self.embed_tokens = Int8Embedding(self.lm_head, self.dtype)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        batch: CacheBatch | None = None,
        logits_indices: Tensor | None = None,
    ) -> Tensor:
        """Logits for `tokens` ([B, T] without a cache, flat [N] with one).

        `logits_indices` selects which token rows get logits (the last of each sequence, when
        serving), so the vocabulary projection is not spent on tokens nobody samples from.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[-1], device=tokens.device)
        cos = self.rope_cos[positions].unsqueeze(-2).to(self.dtype)
        sin = self.rope_sin[positions].unsqueeze(-2).to(self.dtype)
        x = _dropout(self.embed_tokens(tokens), self.dropout, self.training)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache[i], batch)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(
        self, tokens: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0
    ) -> Tensor:
        """Reference generation by full recompute (no cache): simple and obviously right.

        Used for samples during training and as the oracle the cached engine is checked against.
        """
        for _ in range(max_new_tokens):
            context = tokens[:, -self.config.max_position_embeddings :]
            logits = self(context)[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens
