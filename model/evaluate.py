"""`python -m model.evaluate`: validation loss, perplexity and bits per character of a checkpoint.

Bits per character divides total nats by ln 2 and by the characters of the text, so models with
different tokenizers (or none: character-level) compare on one scale.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from model.checkpoint import CheckpointError, load_model
from model.config import DTYPES
from model.data import (
    DEFAULT_EXTENSIONS,
    DataError,
    Document,
    eval_windows,
    read_corpus,
    split_documents,
    token_stream,
)
from model.dtypes import QUANTIZATIONS
from model.kernels import load_cpu_kernels
from model.quantization import check_quantization
from model.tokenizer import Tokenizer, TokenizerError
from model.transformer import Transformer


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """bfloat16/float16 autocast where asked (matmuls in low precision, reductions in float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def stream_nats(
    model: Transformer,
    windows: list[tuple[Tensor, Tensor]],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[float, int]:
    """Summed cross-entropy (nats) and the number of predicted tokens over `windows`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in _batched(windows, batch_size):
        total += token_nats(model, inputs, targets, device, dtype).sum().item()
        count += targets.numel()
    model.train(was_training)
    return total, count


@torch.no_grad()
def token_nats(
    model: Transformer, inputs: Tensor, targets: Tensor, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """The loss (nats) of each target token given the inputs up to it: [B, T] in, [B, T] out.

    Its negation is each token's log-probability under the model: what a server's prompt logprobs report.
    """
    with autocast(device, dtype):
        logits = model(inputs.to(device))
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="none")
    return flat.view(targets.shape)


def _batched(windows: list[tuple[Tensor, Tensor]], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Stack equal-length windows into batches; the shorter last window goes alone."""
    if not windows:
        return
    full = [w for w in windows if len(w[0]) == len(windows[0][0])]
    for i in range(0, len(full), batch_size):
        group = full[i : i + batch_size]
        yield torch.stack([w[0] for w in group]), torch.stack([w[1] for w in group])
    for inputs, targets in windows[len(full) :]:
        yield inputs[None], targets[None]


def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    docs: list[Document],
    seq_len: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per character of `docs` under `model`."""
    device = torch.device(device)
    windows = eval_windows(token_stream(docs, tokenizer), seq_len)
    nats, tokens = stream_nats(model, windows, batch_size, device, dtype)
    chars = sum(len(d.text) for d in docs)
    loss = nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpc": nats / math.log(2) / chars,
        "tokens": tokens,
        "characters": chars,
    }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument(
        "--data", action="append", help="file, directory or glob (repeatable); default: the stdlib source"
    )
    parser.add_argument(
        "--held-out",
        type=float,
        metavar="FRACTION",
        help="evaluate only what a training run with this --val-fraction held out (e.g. 0.05)",
    )
    parser.add_argument("--extensions", default=",".join(DEFAULT_EXTENSIONS), help="for directories")
    parser.add_argument("--seq-len", type=int, default=None, help="default: min(512, max positions)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype")
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="also evaluate with the weights quantized this way, reported beside the unquantized model",
    )
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, dtype=torch.float32, device=args.device)
        tokenizer = Tokenizer.load(args.model)
        docs = read_corpus(args.data, tuple(args.extensions.split(",")))
        if args.held_out is not None:
            if not 0 < args.held_out < 1:
                parser.error(f"--held-out must be in (0, 1), got {args.held_out}")
            docs = split_documents(docs, args.held_out)[1]
    except (CheckpointError, TokenizerError, DataError) as exc:
        raise SystemExit(f"error: {exc}") from None
    max_len = model.config.max_position_embeddings
    seq_len = args.seq_len or min(512, max_len)
    if not 0 < seq_len <= max_len:
        parser.error(
            f"--seq-len must be in 1..{max_len} (the model's max_position_embeddings), got {seq_len}"
        )
    run = functools.partial(
        evaluate, tokenizer=tokenizer, docs=docs, seq_len=seq_len, batch_size=args.batch_size,
        device=args.device, dtype=DTYPES[args.dtype],
    )  # fmt: skip
    metrics = run(model)
    if args.quantization:
        try:
            check_quantization(args.quantization, torch.device(args.device))
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        load_cpu_kernels()
        unquantized = metrics
        model.quantize_int8()
        metrics = {**run(model), "quantization": args.quantization, "unquantized": unquantized}
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
