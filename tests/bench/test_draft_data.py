"""`python -m bench.draft_data` on the tiny checkpoint: one batch of prompt-plus-continuation files, the
prompts cut from the trainer's training split."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.harness import ROOT
from bench.speculative import VAL_FRACTION
from model.data import read_corpus, split_documents
from model.tokenizer import Tokenizer


def test_writes_one_file_per_prompt_from_the_training_split(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    command = [
        *(sys.executable, "-m", "bench.draft_data", "--model", str(tiny_checkpoint), "--out", str(out)),
        *("--minutes", "0", "--batch", "3", "--prompt-tokens", "24", "--new-tokens", "6"),
        *("--threads", "1", "--enforce-eager"),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["000000.txt", "000001.txt", "000002.txt"]
    train, _ = split_documents(read_corpus(None), VAL_FRACTION)
    tokenizer = Tokenizer.load(tiny_checkpoint)
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert 24 < len(tokenizer.encode(text)) <= 24 + 6 + 8  # re-encoding may merge across the seam
        opening = tokenizer.decode(tokenizer.encode(text)[1:12])  # whole tokens of the prompt
        assert any(opening in doc.text for doc in train), opening
