"""What a training step costs and what the machine can do: the autocast dtype, FLOPs per token, MFU.

Model FLOPs utilization (MFU) is the step's model FLOPs per second over the machine's matmul rate in
the compute dtype, measured once at start with the thread count in use (not a datasheet peak: on a
CPU that peak is rarely reachable and depends on what else runs). The FLOPs follow PaLM's appendix B,
as nanoGPT's `estimate_mfu` does: 6 per matmul weight per token (forward and backward; the embedding
lookup is not a matmul, a tied LM head is), plus 12 * layers * attention width * context for attention.
"""

from __future__ import annotations

import time

import torch

from model.config import ModelConfig


def native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast here: CUDA with bf16 support, or a CPU with AMX or AVX512-BF16.

    Elsewhere (an AVX2 CPU) torch's bfloat16 matmuls are emulated and many times slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    return False


def auto_dtype(device: torch.device) -> str:
    """The autocast dtype `--dtype auto` picks: bfloat16 where it is native, else float32."""
    return "bfloat16" if native_bfloat16(device) else "float32"


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward and backward) at context `seq_len`."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    matmul_weights = config.num_hidden_layers * per_layer + config.vocab_size * h  # + the LM head
    return 6 * matmul_weights + 12 * config.num_hidden_layers * q * seq_len


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """The rate of a square matmul in `dtype` on `device`, timed for about `seconds`."""
    n = 4096 if device.type == "cuda" else 1024
    gen = torch.Generator(device).manual_seed(0)  # the global generator is the training run's
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    a @ b  # first call: allocation, kernel selection
    _synchronize(device)
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        _synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
