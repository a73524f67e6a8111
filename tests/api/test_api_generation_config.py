"""A checkpoint's generation_config.json through the real server: its eos_token_ids end generation where
transformers' `generate()` ends it, and (`--generation-config auto`, the default) its sampling values
and max_new_tokens are the defaults of requests that omit them, as vLLM serves them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from transformers import GenerationConfig, LlamaForCausalLM

from bench.harness import free_port
from model.tokenizer import Tokenizer
from tests.model.model_helpers import save_hf_checkpoint
from tests.support import assert_one_line_error, run_server

PROMPT = [5, 17, 99, 250, 31, 7]
STEPS = 24


@pytest.fixture(scope="module")
def hf_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers' own save of a random model (config.json names no eos), with the tiny tokenizer."""
    return save_hf_checkpoint(
        tmp_path_factory.mktemp("hf-generation") / "model",
        tiny_checkpoint,
        seed=11,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def with_generation_config(source: Path, destination: Path, **values: object) -> Path:
    shutil.copytree(source, destination)
    GenerationConfig(**values).save_pretrained(destination)
    return destination


def hf_greedy(directory: Path, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of PROMPT, with the directory's generation_config.json."""
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


def complete(server_url: str, **body: object) -> dict:
    with httpx.Client(base_url=server_url, timeout=60) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        response = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_generation_stops_at_every_eos_of_generation_config_like_transformers(
    start_server, hf_checkpoint: Path, tmp_path: Path
) -> None:
    free = hf_greedy(hf_checkpoint, STEPS)
    assert Tokenizer.load(hf_checkpoint).eos_token_id not in free  # so only generation_config's eos stops
    # The stop: a token first met well inside the greedy run, so stopping early or late both show.
    k = next(i for i in range(6, STEPS) if free[i] not in free[:i])
    unused = next(t for t in range(511, 0, -1) if t not in free)
    directory = with_generation_config(hf_checkpoint, tmp_path / "model", eos_token_id=[unused, free[k]])
    assert hf_greedy(directory, STEPS) == free[: k + 1]  # transformers stops there

    server = start_server(model=directory)
    body = complete(server.url, max_tokens=STEPS, temperature=0)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == k + 1  # greedy tokens match transformers' (tested apart)
    body = complete(server.url, max_tokens=STEPS, temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == STEPS


def test_recommended_sampling_and_max_new_tokens_are_request_defaults(
    start_server, hf_checkpoint: Path, tmp_path: Path
) -> None:
    directory = with_generation_config(
        hf_checkpoint, tmp_path / "model", do_sample=True, top_k=1, max_new_tokens=5
    )
    hot = {"temperature": 2.0, "n": 4, "seed": 3, "ignore_eos": True}
    # auto: top_k 1 applies to a request that omits top_k (so even at temperature 2 every choice is
    # the greedy one), and max_new_tokens caps its 20 tokens at 5.
    auto = start_server(model=directory)
    greedy = complete(auto.url, max_tokens=5, temperature=0)["choices"][0]["text"]
    body = complete(auto.url, max_tokens=20, **hot)
    assert [c["text"] for c in body["choices"]] == [greedy] * 4
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    assert body["usage"]["completion_tokens"] == 4 * 5
    # A request's own value wins over the recommendation.
    body = complete(auto.url, max_tokens=5, top_k=0, **hot)
    assert any(c["text"] != greedy for c in body["choices"])
    assert "top_k=1, max_new_tokens=5" in auto.log()
    # none: the API's defaults (no top_k, no cap).
    plain = start_server("--generation-config", "none", model=directory)
    body = complete(plain.url, max_tokens=5, **hot)
    assert any(c["text"] != greedy for c in body["choices"])
    assert complete(plain.url, max_tokens=20, **hot)["usage"]["completion_tokens"] == 4 * 20


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", ["generation_config.json", "JSON"]),
        (json.dumps({"temperature": 5.0}), ["generation_config.json", "temperature", "config none"]),
        (json.dumps({"top_p": "0.9"}), ["generation_config.json", "top_p", "'0.9'"]),
        (json.dumps({"eos_token_id": ["2"]}), ["generation_config.json", "eos_token_id"]),
        (json.dumps({"max_new_tokens": 0}), ["generation_config.json", "max_new_tokens"]),
    ],
)
def test_bad_generation_config_fails_start_up_with_one_line(
    tiny_checkpoint: Path, tmp_path: Path, content: str, words: list[str]
) -> None:
    directory = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, directory)
    (directory / "generation_config.json").write_text(content)
    result = run_server("--model", str(directory), "--port", str(free_port()), "--enforce-eager")
    assert_one_line_error(result, *words)
