"""The training script end to end on the tiny preset: outputs, exact resume, fine-tuning, DDP, bad input."""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model.train as train_module
from model.checkpoint import load_model
from model.tokenizer import IM_END, Tokenizer
from model.train import main, parse_duration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for module in (textwrap, json.decoder, json.encoder, inspect):
        (root / f"{module.__name__}.py").write_text(inspect.getsource(module))
    return root


def _run(corpus: Path, out: Path, *extra: str) -> dict:
    argv = ["--preset", "tiny", "--data", str(corpus), "--out", str(out), "--device", "cpu"]
    return main([*argv, "--dtype", "float32", "--log-interval", "5", "--sample-tokens", "8", *extra])


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    _run(corpus, out, "--max-steps", "40", "--eval-interval", "20", "--save-dtype", "float32")
    return out


def test_writes_a_servable_checkpoint(trained: Path) -> None:
    tok = Tokenizer.load(trained)
    config = json.loads((trained / "config.json").read_text())
    assert config["bos_token_id"] == tok.bos_token_id
    assert config["eos_token_id"] == [tok.eos_token_id, tok.token_id(IM_END)]
    generation = json.loads((trained / "generation_config.json").read_text())
    assert tok.token_id(IM_END) in generation["eos_token_id"]
    model = load_model(trained)
    assert model.config.vocab_size == tok.vocab_size
    assert not list(trained.glob("*.bin")) and not list(trained.rglob("*.pt"))


def test_log_shows_learning(trained: Path) -> None:
    records = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r and not r.get("final")]
    final = records[-1]
    assert [r["step"] for r in evals] == [20, 40]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert final["final"] and final["stop_reason"] == "max steps"
    assert final["val_loss"] < 0.9 * math.log(512)
    assert final["val_bpc"] > 0 and final["val_perplexity"] > 1
    assert all(r["tokens_per_s"] > 0 for r in records if "tokens_per_s" in r)


def test_resume_is_exact(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop at step 10 (a copy of the resume state), resume to 20: same weights as one 20-step run."""
    real_save = train_module.save_state
    snapshot = tmp_path / "at10"

    def save_and_copy(directory: Path, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real_save(directory, *args, **kwargs)
        if json.loads((directory / "state.json").read_text())["step"] == 10:
            shutil.copytree(directory, snapshot)

    monkeypatch.setattr(train_module, "save_state", save_and_copy)
    flags = ("--max-steps", "20", "--eval-interval", "10", "--dropout", "0.1")
    _run(corpus, tmp_path / "full", *flags)
    monkeypatch.setattr(train_module, "save_state", real_save)
    resumed = _run(corpus, tmp_path / "resumed", *flags, "--resume", str(snapshot))
    assert resumed["step"] == 20
    full_state = load_file(str(tmp_path / "full" / "resume" / "model.safetensors"))
    resumed_state = load_file(str(tmp_path / "resumed" / "resume" / "model.safetensors"))
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)
    with pytest.raises(SystemExit):
        _run(corpus, tmp_path / "again", "--resume", str(snapshot), "--lr", "1")


def test_fine_tune_with_frozen_layers(trained: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    _run(
        corpus,
        out,
        "--init-from",
        str(trained),
        "--freeze-layers",
        "1",
        "--max-steps",
        "5",
        "--save-dtype",
        "float32",
    )
    before, after = load_model(trained).state_dict(), load_model(out).state_dict()
    assert torch.equal(before["layers.0.mlp.down_proj.weight"], after["layers.0.mlp.down_proj.weight"])
    assert not torch.equal(before["layers.1.mlp.down_proj.weight"], after["layers.1.mlp.down_proj.weight"])
    assert Tokenizer.load(out).vocab_size == Tokenizer.load(trained).vocab_size


def test_early_stopping_and_time_budget(corpus: Path, tmp_path: Path) -> None:
    frozen = _run(
        corpus, tmp_path / "a", "--lr", "0", "--min-lr", "0", "--eval-interval", "5", "--patience", "1"
    )
    assert frozen["stop_reason"].startswith("early stop") and frozen["step"] == 10
    timed = _run(corpus, tmp_path / "b", "--max-steps", "100000", "--time-budget", "1s")
    assert timed["stop_reason"] == "time budget" and 0 < timed["step"] < 100000


def test_parse_duration() -> None:
    assert [parse_duration(s) for s in ("90", "90s", "2m", "1.5h")] == [90, 90, 120, 5400]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--heads", "4", "--kv-heads", "3"], "--heads 4 is not divisible by --kv-heads 3"),
        (["--seq-len", "256"], "--seq-len 256 exceeds --max-position-embeddings 128"),
        (["--data", "/nonexistent/corpus"], "--data /nonexistent/corpus: no such file or directory"),
        (["--freeze-layers", "1"], "--freeze-layers needs --init-from"),
        (["--time-budget", "soon"], "--time-budget"),
    ],
)
def test_impossible_flags_are_one_line_errors(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", "--out", str(tmp_path), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no text found"),
        (b"\x00\x01\x02binary", "binary or not UTF-8"),
        (b"caf\xe9", "binary or not UTF-8"),
    ],
)
def test_bad_data_is_a_one_line_error(content: bytes, message: str, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        main(["--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "out")])


def test_cli_error_has_no_traceback(tmp_path: Path) -> None:
    data = tmp_path / "empty.txt"
    data.write_text("")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.train",
            "--preset",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: no text found in {data}"]


def test_torchrun_ddp_matches_single_process(corpus: Path, tmp_path: Path) -> None:
    """2 CPU ranks (gloo) with grad-accum 1 = 1 process with grad-accum 2: same global batch."""
    common = ["--preset", "tiny", "--data", str(corpus), "--device", "cpu", "--dtype", "float32"]
    common += ["--max-steps", "20", "--eval-interval", "10", "--sample-tokens", "0"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "model.train"]
    result = subprocess.run(
        [*cmd, *common, "--out", str(tmp_path / "ddp")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    single = main([*common, "--out", str(tmp_path / "single"), "--grad-accum", "2"])
    final = json.loads((tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()[-1])
    assert len(final["param_checksums"]) == 2
    assert final["param_checksums"][0] == final["param_checksums"][1]
    assert final["val_loss"] == pytest.approx(single["val_loss"], rel=1e-3)
    ddp = load_file(str(tmp_path / "ddp" / "resume" / "model.safetensors"))
    one = load_file(str(tmp_path / "single" / "resume" / "model.safetensors"))
    assert all(torch.allclose(ddp[k], one[k], atol=1e-4) for k in one)
