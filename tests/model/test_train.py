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
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import model.train as train_module
from bench.harness import free_port
from model.checkpoint import load_model
from model.compute import train_flops_per_token
from model.config import ModelConfig
from model.data import Document, read_corpus, sample_prompt
from model.evaluate import evaluate
from model.tokenizer import IM_END, Tokenizer
from model.train import main, parse_args, parse_duration
from server.engine.config import EngineConfig
from server.engine.core import LLMEngine

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


def test_log_shows_learning(trained: Path, corpus: Path) -> None:
    records = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r and not r.get("final")]
    final = records[-1]
    assert [r["step"] for r in evals] == [20, 40]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert final["final"] and final["stop_reason"] == "max steps"
    assert final["val_loss"] < 0.9 * math.log(512)
    assert final["val_bpc"] > 0 and final["val_perplexity"] > 1
    rated = [r for r in records if "tokens_per_s" in r]
    assert rated and all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rated)
    # MFU is tokens/s x FLOPs per token over the matmul rate measured at start, as logged.
    assert final["matmul_flops_per_s"] > 0 and final["dtype"] == "float32"
    for r in rated:
        assert r["mfu"] == pytest.approx(
            r["tokens_per_s"] * final["flops_per_token"] / final["matmul_flops_per_s"]
        )
    # The sample continues the opening of the training data, not a fixed prompt.
    prompt = sample_prompt(read_corpus([str(corpus)]))
    assert final["sample_prompt"] == prompt and prompt.strip()
    assert final["sample"].startswith(prompt) and len(final["sample"]) > len(prompt)


def test_flops_per_token_counts_every_matmul_weight() -> None:
    """6 per weight of every projection and the (tied) LM head, plus PaLM's attention term."""
    config = ModelConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=896, num_hidden_layers=6,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    norms = config.hidden_size * (2 * config.num_hidden_layers + 1)
    matmul_weights = config.num_parameters() - norms  # the tied embedding counted once, as the head
    assert train_flops_per_token(config, 512) == 6 * matmul_weights + 12 * 6 * 384 * 512


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


FOREIGN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def transformers_checkpoint(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama saved by transformers with a tokenizer unlike ours: sentencepiece-style BPE,
    <s>/</s>/<unk>, its own chat template, untied embeddings."""
    directory = tmp_path_factory.mktemp("hf-foreign")
    bpe = HFTokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    bpe.train_from_iterator([p.read_text() for p in sorted(corpus.iterdir())], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=FOREIGN_TEMPLATE,
    )
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_fine_tune_a_transformers_checkpoint_end_to_end(
    transformers_checkpoint: Path, corpus: Path, tmp_path: Path, start_server
) -> None:
    """Fine-tuned, it keeps its own tokenizer files byte for byte, loads in transformers as it does
    here, and serves a chat through its own template."""
    out = tmp_path / "tuned"
    final = _run(corpus, out, "--init-from", str(transformers_checkpoint), "--max-steps", "3")
    assert math.isfinite(final["val_loss"])
    assert final["sample_prompt"] == sample_prompt(read_corpus([str(corpus)]))
    for source in transformers_checkpoint.iterdir():
        if source.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            assert (out / source.name).read_bytes() == source.read_bytes(), source.name
    theirs = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]
    rendered = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ours.apply_chat_template(messages) and rendered.startswith("<s><|system|>")
    ids = ours.encode("import json\ndef f(x):\n    return x", parse_special=True)
    assert ids == theirs.encode("import json\ndef f(x):\n    return x", add_special_tokens=False)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours_logits = load_model(out, dtype=torch.float32)(torch.tensor([ids]))
        assert torch.allclose(hf(torch.tensor([ids])).logits, ours_logits, atol=1e-4)
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)

    server = start_server(model=out)
    with server.client() as client:
        body = {"model": server.model, "messages": messages, "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)
    assert r.json()["usage"]["prompt_tokens"] == len(theirs.encode(rendered, add_special_tokens=False))


@pytest.mark.slow
def test_compiled_step_matches_eager(corpus: Path, tmp_path: Path) -> None:
    """--compile (the default and shakespeare presets' setting) computes the eager step's losses."""
    flags = ("--max-steps", "4", "--log-interval", "1", "--eval-interval", "4", "--sample-tokens", "0")
    _run(corpus, tmp_path / "eager", *flags)
    final = _run(corpus, tmp_path / "compiled", *flags, "--compile")
    assert final["compile"] is True

    def losses(out: Path) -> list[float]:
        records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r] + [records[-1]["val_loss"]]

    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_early_stopping_and_time_budget(corpus: Path, tmp_path: Path) -> None:
    frozen = _run(
        corpus, tmp_path / "a", "--lr", "0", "--min-lr", "0", "--eval-interval", "5", "--patience", "1"
    )
    assert frozen["stop_reason"].startswith("early stop") and frozen["step"] == 10
    timed = _run(corpus, tmp_path / "b", "--max-steps", "100000", "--time-budget", "1s")
    assert timed["stop_reason"] == "time budget" and 0 < timed["step"] < 100000


def test_shakespeare_preset_uses_its_whole_budget(tmp_path: Path) -> None:
    """The preset's own settings (no early stopping, nanoGPT's last-10% split); at a tiny size it
    trains for a few seconds and ends on its time budget, not before; bits/char are of the last 10%."""
    args = parse_args(["--preset", "shakespeare", "--out", str(tmp_path)])
    assert (args.time_budget, args.patience, args.val_fraction, args.compile) == (600, 0, 0.1, True)
    text = "".join(f"SPEAKER {i % 7}:\nSpeak, speak; the {i}th line of a play.\n\n" for i in range(400))
    data = tmp_path / "play.txt"
    data.write_text(text)
    out = tmp_path / "out"
    tiny = ["--hidden-size", "64", "--layers", "2", "--heads", "4", "--kv-heads", "4"]
    tiny += ["--intermediate-size", "128", "--vocab-size", "300", "--max-position-embeddings", "64"]
    final = main([
        "--preset", "shakespeare", "--data", str(data), "--out", str(out), *tiny, "--seq-len", "64",
        "--no-compile", "--time-budget", "4", "--eval-interval", "1", "--log-interval", "1",
        "--sample-tokens", "0", "--device", "cpu",
    ])  # fmt: skip
    assert final["stop_reason"] == "time budget" and final["train_elapsed"] >= 4
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # Evaluated at every step (the interval) and never stopped by it, however many steps 4 s allow.
    evaluated = [r["step"] for r in records if "val_loss" in r and not r.get("final")]
    assert evaluated == list(range(1, final["step"] + 1)), (evaluated, final["step"])
    tail = Document("tail", text[len(text) - int(len(text) * 0.1) :])
    # In the run's compute dtype: bfloat16 where it is native (AVX512-BF16, AMX) moves bits/char by ~1e-4.
    compute = getattr(torch, final["dtype"])
    model = load_model(out, dtype=torch.float32)
    held_out = evaluate(model, Tokenizer.load(out), [tail], seq_len=64, dtype=compute)
    assert final["val_bpc"] == pytest.approx(held_out["bpc"], rel=1e-4)


def test_a_new_model_on_anothers_tokenizer_serves_as_its_draft(
    trained: Path, corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "draft"
    small = ("--hidden-size", "32", "--heads", "2", "--kv-heads", "1", "--intermediate-size", "64")
    _run(corpus, out, "--tokenizer-from", str(trained), *small, "--max-steps", "3")
    assert Tokenizer.load(out).to_json() == Tokenizer.load(trained).to_json()
    assert load_model(out).config.hidden_size == 32
    engine = LLMEngine(
        EngineConfig(model=trained, enforce_eager=True, speculative_method="draft", speculative_model=out)
    )
    assert engine.speculator is not None and engine.speculator.draft is not None


def test_parse_duration() -> None:
    assert [parse_duration(s) for s in ("90", "90s", "2m", "1.5h")] == [90, 90, 120, 5400]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--heads", "4", "--kv-heads", "3"], "--heads 4 is not divisible by --kv-heads 3"),
        (["--seq-len", "256"], "--seq-len 256 exceeds --max-position-embeddings 128"),
        (["--data", "/nonexistent/corpus"], "--data /nonexistent/corpus: no such file or directory"),
        (["--freeze-layers", "1"], "--freeze-layers needs --init-from"),
        (["--tokenizer-from", "/nonexistent/dir"], "--tokenizer-from /nonexistent/dir: not a directory"),
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


DDP_FLAGS = ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--max-steps", "20"]
DDP_FLAGS += ["--eval-interval", "10", "--log-interval", "1", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def one_process(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference for the data-parallel runs: one process, the same global batch by accumulation."""
    out = tmp_path_factory.mktemp("single")
    main([*DDP_FLAGS, "--data", str(corpus), "--out", str(out), "--grad-accum", "2"])
    return out


def _torchrun(launch: list[str], corpus: Path, out: Path) -> subprocess.Popen[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), *launch, "-m", "model.train", *DDP_FLAGS, "--data", str(corpus), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_ddp_matches_single_process(
    nodes: int, corpus: Path, one_process: Path, tmp_path: Path
) -> None:
    """2 CPU ranks (gloo) with grad-accum 1 = 1 process with grad-accum 2: the same loss at every step.

    nodes=1: `--standalone --nproc_per_node 2`. nodes=2: two torchrun "nodes" of one process each
    meeting at a c10d rendezvous on 127.0.0.1, each with its own --out as if they shared no disk
    (rank 0 writes; the other must never need its files).
    """
    if nodes == 1:
        procs = [_torchrun(["--standalone", "--nproc_per_node", "2"], corpus, tmp_path / "0")]
    else:
        rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d"]
        rdzv += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test"]
        procs = [_torchrun(rdzv, corpus, tmp_path / str(n)) for n in range(nodes)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    written = [tmp_path / str(n) for n in range(nodes) if (tmp_path / str(n) / "train_log.jsonl").exists()]
    assert len(written) == 1
    ddp_dir = written[0]
    records = [json.loads(line) for line in (ddp_dir / "train_log.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (one_process / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20
    assert losses == pytest.approx([r["loss"] for r in reference if "loss" in r], rel=1e-4)
    final = records[-1]
    assert len(final["param_checksums"]) == 2
    assert final["param_checksums"][0] == final["param_checksums"][1]
    assert final["val_loss"] == pytest.approx(reference[-1]["val_loss"], rel=1e-4)
    ddp = load_file(str(ddp_dir / "resume" / "model.safetensors"))
    one = load_file(str(one_process / "resume" / "model.safetensors"))
    assert all(torch.allclose(ddp[k], one[k], atol=1e-4) for k in one)
