"""Shared fixtures: a tiny servable checkpoint (random weights, real tokenizer) made in seconds."""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import shutil
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from bench.harness import RunningServer, launch
from model.checkpoint import save_model
from model.config import ModelConfig
from model.tokenizer import IM_END, Tokenizer, train_tokenizer
from model.transformer import Transformer

TINY_TEXTS = (
    inspect.getsource(json.decoder),
    inspect.getsource(textwrap),
    "Hello, world! héllo wörld 😀🚀 你好，世界。日本語のテキスト 한국어\n",
)
LONG_CONTEXT = 8192
"""`long_checkpoint`'s context: at most 8192 tokens of decoding, which takes seconds even on a fast box."""


def make_tiny_checkpoint(directory: Path, seed: int = 0, added_tokens: tuple[str, ...] = ()) -> Path:
    """A checkpoint directory in the shipped layout: BPE tokenizer (vocab 512) and a random 2-layer model.

    `added_tokens` become extra (non-special) vocabulary entries after the 512, each one token.
    """
    tokenizer = train_tokenizer(list(TINY_TEXTS), vocab_size=512, model_max_length=512)
    if added_tokens:
        hf = HFTokenizer.from_str(tokenizer.to_json())
        hf.add_tokens(list(added_tokens))
        tokenizer = Tokenizer(hf, model_max_length=512)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.token_id(IM_END)],
    )
    model = Transformer(config)
    model.init_weights(seed=seed)
    save_model(model, directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def long_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with an 8192-token context, for streams that last seconds on any machine.

    Rotary positions are computed, not learned, so the same weights serve the longer context.
    """
    directory = tmp_path_factory.mktemp("long") / "tiny-long"
    shutil.copytree(tiny_checkpoint, directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    config_path.write_text(json.dumps(config))
    return directory


@contextmanager
def _server_starter(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningServer]]:
    """A function that starts real servers (`python -m server` on 127.0.0.1); all stopped at the end.

    Eager unless `compiled=True`: compiling the decode buckets costs each server seconds at start-up,
    so the suite runs the default (compiled) path where it is the subject (the shared server, the
    fast-path tests) and the many special-flag servers eagerly, to keep `make test` short.
    """
    started: list[RunningServer] = []

    def start(
        *args: str, env: dict[str, str] | None = None, model: Path | None = None, compiled: bool = False
    ) -> RunningServer:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        flags = args if compiled or "--enforce-eager" in args else (*args, "--enforce-eager")
        server = launch(model or tiny_checkpoint, log_path, *flags, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def start_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with extra flags (API key, tiny queues, short grace periods) for one test module;
    they stop when the module ends (`_server_starter` says which run eagerly)."""
    with _server_starter(tiny_checkpoint, tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="session")
def default_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """One server with default flags (as `make serve` runs it: compiled decode buckets), shared by every
    test that needs no flags of its own.

    Each xdist worker starts its own, one after the other (a file lock in the run's shared temp
    folder): the first compiles the buckets, the second finds them in inductor's on-disk cache,
    instead of both compiling at once on two cores.
    """
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    with _server_starter(tiny_checkpoint, tmp_path_factory) as start:
        with (shared / "default-server.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            server = start(compiled=True)
        yield server
