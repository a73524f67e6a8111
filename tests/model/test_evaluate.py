"""Evaluation metrics: loss, perplexity and bits per character agree with each other and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model
from model.data import Document, read_corpus, split_documents, token_stream
from model.evaluate import evaluate, main
from model.tokenizer import Tokenizer

DOCS = [
    Document("a.py", "def add(a, b):\n    return a + b\n" * 20),
    Document("b.txt", "Hello 😀 你好, world.\n" * 30),
]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Path) -> tuple:
    return load_model(tiny_checkpoint), Tokenizer.load(tiny_checkpoint)


def test_metrics_are_consistent(setup: tuple) -> None:
    model, tok = setup
    m = evaluate(model, tok, DOCS, seq_len=64, batch_size=4)
    assert m["tokens"] == len(token_stream(DOCS, tok)) - 1
    assert m["characters"] == sum(len(d.text) for d in DOCS)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["bpc"] == pytest.approx(m["loss"] * m["tokens"] / math.log(2) / m["characters"])
    # Random weights: close to the uniform distribution over the vocabulary.
    assert abs(m["loss"] - math.log(tok.vocab_size)) < 0.5


def test_batching_and_window_length_do_not_change_the_loss_much(setup: tuple) -> None:
    model, tok = setup
    one = evaluate(model, tok, DOCS, seq_len=64, batch_size=1)
    many = evaluate(model, tok, DOCS, seq_len=64, batch_size=7)
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert evaluate(model, tok, DOCS, seq_len=128)["tokens"] == one["tokens"]


def test_matches_a_direct_forward(setup: tuple) -> None:
    model, tok = setup
    doc = [Document("c", "x = [i * i for i in range(10)]\n")]
    stream = token_stream(doc, tok).long()
    with torch.no_grad():
        logits = model(stream[None, :-1])[0]
    nats = torch.nn.functional.cross_entropy(logits, stream[1:], reduction="sum").item()
    assert evaluate(model, tok, doc, seq_len=256)["loss"] == pytest.approx(nats / (len(stream) - 1), rel=1e-5)


def test_cli_prints_json(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "eval.txt"
    data.write_text(DOCS[0].text)
    metrics = main(
        ["--model", str(tiny_checkpoint), "--data", str(data), "--device", "cpu", "--seq-len", "64"]
    )
    assert json.loads(capsys.readouterr().out) == metrics
    assert metrics["characters"] == len(DOCS[0].text)


def test_cli_errors_are_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="^error: .*not a checkpoint directory"):
        main(["--model", str(tmp_path / "nope"), "--data", str(tmp_path)])
    with pytest.raises(SystemExit, match="^error: .*no such file"):
        main(["--model", str(tiny_checkpoint), "--data", str(tmp_path / "missing.txt")])


def test_cli_reports_int8_beside_the_unquantized_model(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "eval.txt"
    data.write_text(DOCS[0].text)
    args = ["--model", str(tiny_checkpoint), "--data", str(data), "--device", "cpu", "--seq-len", "64"]
    metrics = main([*args, "--quantization", "int8"])
    assert json.loads(capsys.readouterr().out) == metrics
    plain = metrics["unquantized"]
    assert metrics["quantization"] == "int8" and plain == main(args)
    assert metrics["tokens"] == plain["tokens"] and metrics["loss"] != plain["loss"]  # really quantized
    assert metrics["loss"] == pytest.approx(plain["loss"], rel=0.02)  # and still the same model


def test_cli_held_out_evaluates_only_what_training_held_out(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "eval.txt"
    data.write_text(DOCS[0].text)
    args = ["--model", str(tiny_checkpoint), "--data", str(data), "--device", "cpu", "--seq-len", "64"]
    held_out = split_documents(read_corpus([str(data)]), 0.25)[1]
    assert (
        main([*args, "--held-out", "0.25"])["characters"]
        == sum(len(d.text) for d in held_out)
        < len(DOCS[0].text)
    )
    with pytest.raises(SystemExit):
        main([*args, "--held-out", "1.5"])
    assert "--held-out must be in (0, 1)" in capsys.readouterr().err
