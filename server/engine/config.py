"""EngineConfig: the engine's knobs. `server/settings.py` maps flags onto it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    model: Path
    device: str = "auto"
    """torch device; "auto" is CUDA when present, else the CPU."""
    dtype: str | None = None
    """float32, bfloat16 or float16; None keeps the checkpoint's own dtype."""
    quantization: str | None = None
    """"int8": weight-only int8 rows (model/quantization.py), activations in `dtype`; None: as stored."""
    max_model_len: int | None = None
    """Context length served; None is the model's max_position_embeddings."""
    kv_cache_tokens: int | None = None
    """KV cache size in tokens; None derives it from kv_cache_memory."""
    kv_cache_memory: int = 1 << 30
    """Bytes for the KV cache when kv_cache_tokens is not given (capped at what max_num_seqs can use)."""
    block_size: int = 16
    max_num_seqs: int = 64
    """Most sequences in the running batch."""
    max_buffered_events: int = 4096
    """Most events a request may have waiting for its client; one further behind is cut, its cache freed."""
    max_waiting: int = 256
    """Most requests queued before new ones are refused as overloaded."""
    prefill_chunk_tokens: int = 256
    """Most prompt tokens computed in one step: bounds how long a long prompt stalls the streams."""
    enable_prefix_caching: bool = True
    deterministic: bool = False
    """Batch-invariant results: every sequence computed on its own, at fixed chunk boundaries."""
    enforce_eager: bool = False
    """Run every step eagerly: no compiled decode graphs (faster start-up, slower decoding)."""
    num_threads: int | None = None
    seed: int = 0
