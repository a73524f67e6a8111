"""Shared helpers for the model tests: one intra-op thread, and random weights that make a dropped
tensor visible."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: extra intra-op threads only add sync cost (~5x wall time on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_(module: nn.Module, seed: int) -> None:
    """Weights large enough that logits have clear winners (greedy is stable) and every term matters.

    Norm weights and biases are made non-trivial too, so a loader that dropped them would be caught.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                value = 0.1 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                value = torch.randn(p.shape, generator=gen)
            else:
                value = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
            p.copy_(value.to(p.dtype))


def save_hf_checkpoint(directory: Path, tokenizer_from: Path, seed: int, **config: Any) -> Path:
    """transformers' own save of a random Llama (`config` over no bos/eos/pad ids), with the tokenizer
    files of `tokenizer_from`: a checkpoint the server loads as a user's would."""
    ids: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    model = LlamaForCausalLM(LlamaConfig(**{**ids, **config})).eval()
    randomize_(model, seed=seed)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, directory / name)
    return directory
