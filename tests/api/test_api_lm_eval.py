"""lm-evaluation-harness (`lm_eval`, the `eval` extra) scores likelihood tasks against the real server.

Its `local-completions` model sends each (context, continuation) as token ids with `echo`, `logprobs: 1`
and `max_tokens: 1`, and sums the echoed continuation's logprobs. Two tasks defined from local files (no
download): multiple choice (loglikelihood) and perplexity (loglikelihood_rolling). Every score it
logs must equal model.evaluate's per-token losses on the same tokens (float32, within 1e-4).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.harness import RunningServer
from model.checkpoint import load_model
from model.evaluate import token_nats

pytestmark = pytest.mark.slow

QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " a dog", " blue"], "answer": 0},
    {"question": "def main():\n    return", "choices": [" 0", " None", " main"], "answer": 1},
    {"question": "Hello, world!", "choices": ["\n", " héllo wörld 😀"], "answer": 0},
]
TEXTS = [{"text": "import json\n\ndef load(path):\n    return json.loads(open(path).read())\n"}]
TASKS = """
task: tiny_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {choice}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc}}]
---
task: tiny_perplexity
dataset_path: json
dataset_kwargs: {{data_files: {{test: {texts}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: bits_per_byte}}]
"""


@pytest.fixture(scope="module")
def scorer(start_server: Callable[..., RunningServer]) -> RunningServer:
    if importlib.util.find_spec("lm_eval") is None:
        reason = "lm_eval is not installed (pip install -e '.[eval]'; make test installs it)"
        warnings.warn(f"lm-evaluation-harness test skipped: {reason}", pytest.PytestWarning, stacklevel=2)
        pytest.skip(reason)
    return start_server("--dtype", "float32")


def run_lm_eval(server: RunningServer, checkpoint: Path, work: Path) -> list[dict]:
    for name, rows in (("choice.jsonl", QUESTIONS), ("texts.jsonl", TEXTS)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i, task in enumerate(TASKS.split("---")):
        text = task.format(choice=work / "choice.jsonl", texts=work / "texts.jsonl")
        (work / f"task{i}.yaml").write_text(text)
    model_args = (
        f"model={server.model},base_url={server.url}/v1/completions,tokenizer={checkpoint},"
        "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1,max_length=512"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf")}
    command = [
        sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
        "--tasks", "tiny_choice,tiny_perplexity", "--include_path", str(work), "--batch_size", "1",
        "--output_path", str(work / "out"), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = sorted((work / "out").rglob("samples_*.jsonl"))
    assert len(samples) == 2, samples
    return [json.loads(line) for path in samples for line in path.read_text().splitlines()]


def test_lm_eval_scores_equal_model_evaluate(
    scorer: RunningServer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    samples = run_lm_eval(scorer, tiny_checkpoint, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    model = load_model(tiny_checkpoint, dtype=torch.float32, device="cpu")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    def loglikelihood(context: list[int], continuation: list[int]) -> float:
        tokens = torch.tensor([context + continuation])
        nats = token_nats(model, tokens[:, :-1], tokens[:, 1:], torch.device("cpu"), torch.float32)
        return -nats[0, len(context) - 1 :].sum().item()

    checked = 0
    for sample in samples:
        for args, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            got = float(resp[0][0] if isinstance(resp[0], list) else resp[0])
            if "text" in sample["doc"]:  # rolling: the whole text after the prefix (BOS) token
                expected = loglikelihood([tokenizer.bos_token_id], encode(args["arg_0"]))
            else:  # lm_eval's _encode_pair: trailing spaces of the context go to the continuation
                context, continuation = args["arg_0"], args["arg_1"]
                whole, head = encode(context + continuation), encode(context)
                expected = loglikelihood(head, whole[len(head) :])
            assert got == pytest.approx(expected, abs=1e-4), (sample["doc"], args)
            checked += 1
    assert checked == sum(len(q["choices"]) for q in QUESTIONS) + len(TEXTS)
