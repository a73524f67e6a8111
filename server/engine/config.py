"""EngineConfig: the engine's knobs, each with the help text its server flag shows.

`server/settings.py` builds one flag per field from this class (name, default, help), so a knob is
declared once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPECULATIVE_METHODS = ("ngram", "draft")
GENERATION_CONFIGS = ("auto", "none")


def knob(help: str, default: Any = None) -> Any:
    """A field with its help text (the flag's, in `python -m server --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    model: Path = field(metadata={"help": "checkpoint directory (config.json, model.safetensors, tokenizer)"})
    device: str = knob("torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1", "auto")
    dtype: str | None = knob("compute dtype (default: the checkpoint's)")
    quantization: str | None = knob(
        "weight-only quantization (CPU): int8 rows with a scale each, half bfloat16's bytes per step; "
        "activations stay in --dtype (default: none, the weights as stored)"
    )
    generation_config: str = knob(
        "auto: the sampling values the checkpoint's generation_config.json recommends (temperature, "
        "top_p, top_k, min_p, repetition_penalty) are the defaults of requests that omit them, and its "
        "max_new_tokens caps every request's max_tokens, as vLLM does; none: the API's own defaults. "
        "Its eos_token_id ends generation either way, as in transformers",
        "auto",
    )
    max_model_len: int | None = knob("context length served (default: the model's)")
    kv_cache_tokens: int | None = knob("KV cache size in tokens (default: derived from --kv-cache-memory)")
    kv_cache_memory: int = knob(
        "KV cache budget in bytes when the size in tokens is not given, e.g. 512M or 2G "
        "(capped at what max-num-seqs full sequences can use)",
        1 << 30,
    )
    block_size: int = knob("KV cache page size in tokens", 16)
    max_num_seqs: int = knob("most sequences decoded together", 64)
    max_buffered_events: int = knob(
        "most undelivered events per request; a client further behind is cut and its cache freed", 4096
    )
    max_waiting: int = knob("most requests queued; beyond it new ones get 503 + Retry-After", 256)
    prefill_chunk_tokens: int = knob(
        "most prompt tokens computed per step: bounds how long a long prompt stalls the streams", 256
    )
    enable_prefix_caching: bool = knob("reuse the KV of shared prompt prefixes", True)
    deterministic: bool = knob(
        "batch-invariant results, slower: every sequence computed on its own, at fixed chunk boundaries",
        False,
    )
    enforce_eager: bool = knob(
        "run every step eagerly: no compiled decode graphs (faster start, slower decode)", False
    )
    grammar_compile_timeout: float = knob(
        "seconds a new JSON Schema, regex or grammar may take to compile before its request is refused (400)",
        10.0,
    )
    speculative_method: str | None = knob(
        "speculative decoding: ngram (prompt lookup: propose the tokens that followed the latest earlier "
        "occurrence of the sequence's last n-gram) or draft (a smaller model, --speculative-model, "
        "proposes them); the model verifies them in one decode step (default: none)"
    )
    speculative_model: Path | None = knob(
        "checkpoint directory of the draft model (--speculative-method draft): same tokenizer, smaller"
    )
    # 3: one sequence's verify step (k + 1 = 4 rows) fills a compiled decode bucket; with 4 it took the
    # 8-row bucket, and single-stream speed-ups fell (shipped model, one run each: code 2.18x against
    # 1.80x with ngram, 1.28x against 1.12x with the distilled draft; README, Speculative decoding).
    num_speculative_tokens: int = knob("tokens proposed per sequence and step when speculating", 3)
    prompt_lookup_min: int = knob("shortest n-gram the ngram proposer matches", 2)
    prompt_lookup_max: int = knob("longest n-gram the ngram proposer matches (tried first)", 5)
    speculative_disable_by_batch_size: int = knob(
        "no speculation in a step that decodes more sequences than this (verifying costs compute a "
        "larger batch no longer has to spare)",
        4,
    )
    num_threads: int | None = knob("torch CPU threads (default: torch's)")
    seed: int = knob("engine seed for unseeded requests", 0)
