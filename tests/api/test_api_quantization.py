"""`--quantization int8` through the real server: the shipped model keeps its greedy answers, seeded
sampling repeats, and a checkpoint saved by transformers with awkward shapes serves exactly what
transformers computes with the same (de-quantized) weights."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

from bench.harness import ROOT
from model.quantization import dequantize_rows, quantize_rows
from model.tokenizer import Tokenizer
from tests.model.model_helpers import save_hf_checkpoint

SHIPPED = ROOT / "weights" / "default"
CODE_PROMPTS = [
    "import os\n\n\ndef ",
    "def read_lines(path):\n    with open(path) as f:\n",
    "class Stack:\n    def __init__(self):\n        self.",
    "for i in range(10):\n    ",
    "if __name__ == '__main__':\n    ",
    "def fibonacci(n):\n    ",
    "try:\n    import json\nexcept ImportError:\n    ",
    "    def __repr__(self):\n        return ",
    "from collections import ",
    "def _check_arg(value, name):\n    if not isinstance(value, int):\n        raise ",
    "    @property\n    def name(self):\n        ",
    "def main(argv=None):\n    parser = argparse.ArgumentParser(",
    "result = []\nfor item in items:\n    if ",
    "    def close(self):\n        if self._closed:\n            return\n        ",
    '"""Utilities for working with paths."""\n\nimport ',
    "def parse_header(line):\n    key, _, value = line.partition(",
    "        except OSError as exc:\n            ",
    "    return {k: v for k, v in ",
    "class Error(Exception):\n    ",
    "def __init__(self, *args, **kwargs):\n        super().__init__(",
]


def complete(client: httpx.Client, **body: object) -> dict:
    model = client.get("/v1/models").json()["data"][0]["id"]
    response = client.post("/v1/completions", json={"model": model, **body})
    assert response.status_code == 200, response.text
    return response.json()


def greedy_tokens(client: httpx.Client, prompts: list[str], max_tokens: int) -> list[list[str]]:
    """Every prompt's greedy tokens, from one batched request."""
    body = {"prompt": prompts, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    choices = sorted(complete(client, **body)["choices"], key=lambda c: c["index"])
    return [c["logprobs"]["tokens"] for c in choices]


def agreement(a: list[list[str]], b: list[list[str]]) -> float:
    """The share of equal greedy tokens, position by position."""
    pairs = [(x, y) for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def test_shipped_model_int8_is_as_faithful_as_bfloat16(start_server) -> None:
    """Against the float32 model's greedy tokens (20 prompts x 64), int8 weights with bfloat16
    activations agree at least as well as bfloat16 itself does, less 5 points (the figures are printed).

    Not int8 against bfloat16 directly: on the shipped weights bfloat16's own rounding already moves
    greedy tokens off float32's (87% agree), so the two half-precision paths differ by both noises.
    """
    servers = [
        start_server("--dtype", "float32", model=SHIPPED),
        start_server("--dtype", "bfloat16", model=SHIPPED),
        start_server("--dtype", "bfloat16", "--quantization", "int8", model=SHIPPED),
    ]
    runs = []
    for server in servers:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            runs.append(greedy_tokens(client, CODE_PROMPTS, 64))
    full, bf16, int8 = runs
    assert all(len(tokens) == 64 for run in runs for tokens in run)
    print(
        f"\nshipped model, greedy agreement with float32: bfloat16 {agreement(full, bf16):.1%}, "
        f"int8 {agreement(full, int8):.1%}; int8 with bfloat16 {agreement(bf16, int8):.1%}"
    )
    assert agreement(full, int8) >= agreement(full, bf16) - 0.05
    assert "int8 weights" in servers[2].log() and "bfloat16 weights" in servers[1].log()


def test_int8_seeded_sampling_repeats_through_the_server(start_server) -> None:
    server = start_server("--quantization", "int8")
    body = {"prompt": "def ", "max_tokens": 32, "temperature": 1.0, "top_k": 50, "seed": 5, "n": 2}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        first, second = (complete(client, **body) for _ in range(2))
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in second["choices"]] and texts[0] != texts[1]


@pytest.fixture(scope="module")
def awkward_hf_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers' own save: hidden 72 (not a multiple of 64), GQA 6:2, tied embeddings, vocab 512."""
    return save_hf_checkpoint(
        tmp_path_factory.mktemp("hf-awkward"),
        tiny_checkpoint,
        seed=3,
        vocab_size=512,
        hidden_size=72,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )


def test_transformers_checkpoint_serves_int8_as_transformers_computes_it(
    start_server, awkward_hf_checkpoint: Path
) -> None:
    """The oracle: transformers' model with every linear weight (and the tied embedding) replaced by
    its int8 round trip, in float32. Greedy tokens must be the same."""
    reference = LlamaForCausalLM.from_pretrained(awkward_hf_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantize_rows(*quantize_rows(module.weight)))
    tokenizer = Tokenizer.load(awkward_hf_checkpoint)
    server = start_server("--dtype", "float32", "--quantization", "int8", model=awkward_hf_checkpoint)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for prompt in ("def f(x):\n", "Hello, world", "import json\n"):
            ids = tokenizer.encode(prompt)
            with torch.no_grad():
                out = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
            want = tokenizer.decode(out[0, len(ids) :].tolist())
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            assert complete(client, **body)["choices"][0]["text"] == want, prompt
