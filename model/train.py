"""`python -m model.train`: corpus → tokenizer → AdamW loop (optionally `torchrun` DDP) → checkpoint dir.

Weight decay applies to the block matrices (q/k/v/o, gate/up/down) and an untied lm_head only;
norms, biases and the embedding (tied or not) are not decayed, since shrinking them fights the
normalization rather than regularizing. The learning rate warms up linearly, then follows a cosine
to --min-lr over the run's progress: steps done / --max-steps or time spent / --time-budget,
whichever is further along. Resume state (model, optimizer, RNG, data position) is safetensors +
JSON in OUT/resume; the servable checkpoint in OUT is the one with the best validation loss.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from model.checkpoint import WEIGHTS_FILE, CheckpointError, load_model, save_model
from model.compute import auto_dtype, matmul_flops_per_s, train_flops_per_token
from model.config import DTYPES, ConfigError, ModelConfig
from model.data import (
    DEFAULT_EXTENSIONS,
    Batches,
    DataError,
    eval_windows,
    read_corpus,
    sample_prompt,
    split_documents,
    token_stream,
)
from model.evaluate import autocast, default_device, stream_nats
from model.tokenizer import Tokenizer, TokenizerError, copy_tokenizer_files, train_tokenizer
from model.transformer import Transformer

ARCH_FLAGS = {
    "hidden_size": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "tie_embeddings": "tie_word_embeddings",
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, vocab_size=512,
        max_position_embeddings=128, rope_theta=10000.0, tie_embeddings=True, seq_len=64, batch_size=8,
        grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=40, time_budget=None,
        eval_interval=20, eval_batches=4, patience=0, dropout=0.0, val_fraction=0.05, compile=False,
    ),
    "default": dict(
        hidden_size=384, layers=6, heads=6, kv_heads=2, intermediate_size=896, vocab_size=8192,
        max_position_embeddings=1024, rope_theta=10000.0, tie_embeddings=True, seq_len=512, batch_size=8,
        grad_accum=2, lr=2e-3, min_lr=2e-4, warmup_steps=100, max_steps=None, time_budget="120m",
        eval_interval=200, eval_batches=16, patience=8, dropout=0.0, val_fraction=0.05, compile=True,
    ),
    "shakespeare": dict(
        hidden_size=192, layers=4, heads=6, kv_heads=6, intermediate_size=512, vocab_size=1024,
        max_position_embeddings=256, rope_theta=10000.0, tie_embeddings=True, seq_len=256, batch_size=8,
        grad_accum=1, lr=2e-3, min_lr=2e-4, warmup_steps=100, max_steps=None, time_budget="10m",
        eval_interval=200, eval_batches=25, patience=0, dropout=0.0, val_fraction=0.1, compile=True,
    ),
}  # fmt: skip
# default: intermediate 896 rather than 1024 keeps the bfloat16 weights under 25 MB (11.7M parameters).
# shakespeare: the 10-minute CPU recipe for one text file (Tiny Shakespeare: 1.1M characters, the last
# 10% held out as nanoGPT does). 2M parameters, 2.26 characters per token; no early stopping, so the
# cosine ends with the budget; each probe (25 x 8 windows of 256 tokens) covers the whole held-out tenth.

# Flags a resumed run may change; every other setting comes from the saved run.
RESUME_OVERRIDES = (
    "out", "resume", "max_steps", "time_budget", "device", "log_interval", "save_interval", "compile",
)  # fmt: skip
STATE_DIR = "resume"
LOG_FILE = "train_log.jsonl"


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '60m' or '1.5h'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected seconds or a duration like 60m or 1.5h, got {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", help="file, directory or glob (repeatable); default: stdlib")
    p.add_argument("--extensions", default=",".join(DEFAULT_EXTENSIONS), help="walked in directories")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--init-from", help="fine-tune this checkpoint (its architecture and tokenizer)")
    p.add_argument(
        "--tokenizer-from",
        help="train a new model on this checkpoint's tokenizer instead of training one (for example a "
        "draft model for the server's --speculative-model, which must share the served model's tokenizer)",
    )
    p.add_argument("--freeze-layers", type=int, default=0, help="with --init-from: freeze the first K layers")
    p.add_argument("--resume", help="continue exactly from OUT/resume of an earlier run")
    arch = p.add_argument_group("architecture (default: from the preset)")
    for flag in ("hidden-size", "layers", "heads", "kv-heads", "intermediate-size", "vocab-size"):
        arch.add_argument(f"--{flag}", type=int)
    arch.add_argument("--max-position-embeddings", type=int)
    arch.add_argument("--rope-theta", type=float)
    arch.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None)
    train = p.add_argument_group("training (default: from the preset)")
    train.add_argument("--seq-len", type=int)
    train.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    train.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step per process")
    train.add_argument("--lr", type=float)
    train.add_argument("--min-lr", type=float)
    train.add_argument("--warmup-steps", type=int)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--grad-clip", type=float, default=1.0)
    train.add_argument("--dropout", type=float)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--time-budget", type=str, help="seconds, or e.g. 60m, 1.5h")
    train.add_argument("--eval-interval", type=int)
    train.add_argument("--eval-batches", type=int)
    train.add_argument("--patience", type=int, help="stop after this many evals without improvement; 0: off")
    train.add_argument("--val-fraction", type=float, help="held-out share: whole files, or each file's tail")
    train.add_argument(
        "--save-interval", type=int, help="steps between resume states (default: eval interval)"
    )
    train.add_argument("--log-interval", type=int, default=10)
    train.add_argument("--sample-tokens", type=int, default=200, help="length of the final sample; 0: none")
    train.add_argument("--seed", type=int, default=1337)
    train.add_argument("--device", default=default_device())
    train.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help="autocast compute dtype; auto: bfloat16 where the device multiplies it natively, else float32",
    )
    train.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the training step (forward, loss and backward); the first step pays for it",
    )
    train.add_argument("--save-dtype", choices=sorted(DTYPES), default="bfloat16", help="servable weights")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags over preset over saved run (when resuming), then every impossible combination rejected."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        state_file = Path(args.resume) / "state.json"
        if not state_file.is_file():
            parser.error(
                f"--resume {args.resume}: no state.json (expected OUT/{STATE_DIR} of an earlier run)"
            )
        saved = json.loads(state_file.read_text())["args"]
        given = {k: v for k, v in vars(args).items() if v != parser.get_default(k)}
        changed = sorted(k for k, v in given.items() if k not in RESUME_OVERRIDES and saved.get(k) != v)
        if changed:
            parser.error(f"--resume continues the saved run; cannot change --{changed[0].replace('_', '-')}")
        args = argparse.Namespace(**{**saved, **given})
    # Preset values fill what is unset (and settings a resumed run's older trainer did not have).
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if isinstance(args.time_budget, str):
        try:
            args.time_budget = parse_duration(args.time_budget)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--time-budget: {exc}")
    _validate(parser, args)
    return args


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    tokenizer_from = getattr(args, "tokenizer_from", None)  # absent from runs saved by older trainers
    if tokenizer_from and args.init_from:
        parser.error("--tokenizer-from trains a new model: drop --init-from, which brings its own tokenizer")
    if tokenizer_from and not args.resume and not Path(tokenizer_from).is_dir():
        parser.error(f"--tokenizer-from {tokenizer_from}: not a directory")
    if args.init_from:
        explicit = [f for f in ARCH_FLAGS if getattr(args, f) != PRESETS[args.preset][f]]
        if explicit:
            parser.error(f"--init-from takes the architecture from the checkpoint; drop --{explicit[0]}")
        if not Path(args.init_from).is_dir():
            parser.error(f"--init-from {args.init_from}: not a directory")
    elif args.freeze_layers:
        parser.error("--freeze-layers needs --init-from")
    else:
        if args.hidden_size % args.heads:
            parser.error(f"--hidden-size {args.hidden_size} is not divisible by --heads {args.heads}")
        if args.heads % args.kv_heads:
            parser.error(f"--heads {args.heads} is not divisible by --kv-heads {args.kv_heads}")
        if args.seq_len > args.max_position_embeddings:
            parser.error(
                f"--seq-len {args.seq_len} exceeds --max-position-embeddings {args.max_position_embeddings}"
            )
    for name in ("seq_len", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps is None and args.time_budget is None:
        parser.error("give --max-steps or --time-budget (or a preset that sets one)")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    for spec in args.data or []:
        if not Path(spec).exists() and not any(ch in spec for ch in "*?["):
            parser.error(f"--data {spec}: no such file or directory")


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def from_main(self, value: float, device: torch.device) -> float:
        """Rank 0's value everywhere: decisions that depend on the clock must agree across ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(t, 0)
        return t.item()

    def gather(self, t: Tensor, device: torch.device) -> list[Tensor]:
        if self.world == 1:
            return [t]
        parts = [torch.empty_like(t, device=device) for _ in range(self.world)]
        dist.all_gather(parts, t.to(device))
        return [x.cpu() for x in parts]

    def text_from_main(self, text: str | None, device: torch.device) -> str:
        """Rank 0's text on every rank, sent as UTF-8 bytes: nodes need share no filesystem, and
        nothing is pickled between ranks."""
        if self.world == 1:
            assert text is not None
            return text
        data = text.encode() if self.main and text is not None else b""
        size = int(self.from_main(float(len(data)), device))
        buffer = torch.zeros(size, dtype=torch.uint8, device=device)
        if self.main:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, 0)
        return buffer.cpu().numpy().tobytes().decode()

    def tensors_from_main(self, tensors: list[Tensor]) -> None:
        """Overwrite each tensor (same shapes on every rank) with rank 0's, in place."""
        if self.world > 1:
            for t in tensors:
                dist.broadcast(t, 0)


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(), torch.device(device)
    local = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size()), dev


def lr_at(args: argparse.Namespace, step: int, progress: float) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: Transformer, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW; fused (one kernel for all parameters) where torch has it: 4x faster than foreach here."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() == 2 and name.startswith(("layers.", "lm_head.")) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda") or None
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def save_state(
    directory: Path,
    model: Transformer,
    tokenizer_dir: Path,
    opt: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> None:
    """Everything an exact resume needs; written to a temporary dir and renamed so it is never half-done."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, dtype=torch.float32)
    copy_tokenizer_files(tokenizer_dir, tmp)
    opt_state = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
    save_file(meta.pop("rng"), str(tmp / "rng.safetensors"))
    meta["param_groups"] = opt_state["param_groups"]
    (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def load_optimizer_state(directory: Path, opt: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, tensor in load_file(str(directory / "optimizer.safetensors")).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(d: Dist, device: torch.device) -> dict[str, Tensor]:
    comm = device if device.type == "cuda" else torch.device("cpu")
    out = {f"cpu.{r}": t for r, t in enumerate(d.gather(torch.get_rng_state(), comm))}
    if device.type == "cuda":
        out |= {f"cuda.{r}": t for r, t in enumerate(d.gather(torch.cuda.get_rng_state(device), comm))}
    return out


def servable(model: Transformer, tokenizer: Tokenizer) -> Transformer:
    """The model with the tokenizer's BOS/EOS ids in its config; eos lists <|im_end|> too (ends turns)."""
    eos = tokenizer.stop_token_ids
    config = dataclasses.replace(
        model.config, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0]
    )
    model.config = config
    return model


@dataclasses.dataclass
class Prepared:
    tokenizer: Tokenizer
    train_stream: Tensor
    val_stream: Tensor
    val_chars: int
    model: Transformer
    sample_prompt: str


def prepare(args: argparse.Namespace, d: Dist, device: torch.device) -> Prepared:
    """Data, tokenizer and model (fresh, or from --init-from/--resume), or a one-line SystemExit.

    A fresh tokenizer is trained by rank 0 and sent to the others, so nodes need share no disk.
    """
    source = args.resume or args.init_from
    try:
        docs = read_corpus(args.data, tuple(args.extensions.split(",")))
        train_docs, val_docs = split_documents(docs, args.val_fraction)
        if source:
            tokenizer = Tokenizer.load(source)
            loaded = load_model(source, dtype=torch.float32)
            config = loaded.config
        else:
            if getattr(args, "tokenizer_from", None):
                tokenizer = Tokenizer.load(args.tokenizer_from)
            else:
                trained = None
                if d.main:
                    texts = [doc.text for doc in train_docs]
                    trained = train_tokenizer(texts, args.vocab_size, args.max_position_embeddings).to_str()
                spec = d.text_from_main(trained, device)
                tokenizer = Tokenizer.from_str(spec, args.max_position_embeddings)
            arch = {field: getattr(args, flag) for flag, field in ARCH_FLAGS.items()}
            config = ModelConfig(**{**arch, "vocab_size": tokenizer.vocab_size})
        if args.seq_len > config.max_position_embeddings:
            raise ConfigError(
                f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings}"
            )
        if args.freeze_layers > config.num_hidden_layers:
            raise ConfigError(
                f"--freeze-layers {args.freeze_layers} exceeds the {config.num_hidden_layers} layers"
            )
        train_stream, val_stream = token_stream(train_docs, tokenizer), token_stream(val_docs, tokenizer)
    except (DataError, TokenizerError, CheckpointError, ConfigError) as exc:
        raise SystemExit(f"error: {exc}") from None
    model = Transformer(config, dropout=args.dropout)
    if source:
        model.load_state_dict(loaded.state_dict())
    else:
        model.init_weights(seed=args.seed)
    for layer in model.layers[: args.freeze_layers]:
        layer.requires_grad_(False)
    val_chars = sum(len(doc.text) for doc in val_docs)
    return Prepared(
        tokenizer, train_stream, val_stream, val_chars, servable(model, tokenizer), sample_prompt(train_docs)
    )


def save_tokenizer(args: argparse.Namespace, tokenizer: Tokenizer, out: Path) -> None:
    """OUT's tokenizer: the source checkpoint's files as they are, or the one trained here."""
    source = args.resume or args.init_from or getattr(args, "tokenizer_from", None)
    if source:
        copy_tokenizer_files(source, out)
    else:
        tokenizer.save(out)


class NextTokenLoss(nn.Module):
    """Mean next-token cross-entropy of `model` under autocast.

    One module, so that torch.compile sees the LM head and the loss together (the vocabulary-wide
    logits never need a separate pass) and DistributedDataParallel wraps the whole training forward.
    """

    def __init__(self, model: Transformer, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.dtype = dtype

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        with autocast(self.device, self.dtype):
            logits = self.model(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def log(out: Path, record: dict[str, Any], line: str | None = None) -> None:
    with (out / LOG_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")
    if line:
        print(line, flush=True)


def param_checksum(model: Transformer) -> float:
    """A float64 fingerprint of every parameter: equal across data-parallel ranks that stayed in sync."""
    with torch.no_grad():
        return sum(float(p.double().sum() + p.double().abs().sum()) for p in model.parameters())


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by `args`; returns the final record written to train_log.jsonl."""
    wall_start = time.perf_counter()
    d, device = setup_distributed(args.device)
    torch.manual_seed(args.seed + d.rank)
    out = Path(args.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (out / LOG_FILE).unlink(missing_ok=True)
    prepared = prepare(args, d, device)
    tokenizer, model = prepared.tokenizer, prepared.model
    if d.main:
        save_tokenizer(args, tokenizer, out)
    model.to(device).train()
    dtype_name = auto_dtype(device) if args.dtype == "auto" else args.dtype
    compute = DTYPES[dtype_name]
    global_batch = args.batch_size * args.grad_accum * d.world
    try:
        batches = Batches(prepared.train_stream, args.seq_len, global_batch, args.seed)
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None
    opt = make_optimizer(model, args, device)
    step, elapsed, best, bad_evals = 0, 0.0, math.inf, 0
    if args.resume:
        rdir = Path(args.resume)
        meta = json.loads((rdir / "state.json").read_text())
        load_optimizer_state(rdir, opt, meta["param_groups"])
        batches.load_state_dict(meta["data"])
        step, elapsed, best, bad_evals = (
            meta["step"],
            meta["elapsed"],
            meta["best_val_loss"],
            meta["bad_evals"],
        )
        rng = load_file(str(rdir / "rng.safetensors"))
        if f"cpu.{d.rank}" in rng:
            torch.set_rng_state(rng[f"cpu.{d.rank}"])
        if device.type == "cuda" and f"cuda.{d.rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda.{d.rank}"], device)
    loss_of: nn.Module = NextTokenLoss(model, device, compute)
    if args.compile:
        loss_of.compile(dynamic=False)
    ddp = None
    if d.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        # The rotary tables are the only buffers, and constant: nothing to send each step.
        ddp = DistributedDataParallel(loss_of, device_ids=ids, forward_sync_buffers=False)
    net = ddp or loss_of
    all_val = eval_windows(prepared.val_stream, args.seq_len)
    n_probe = args.eval_batches * args.batch_size
    probe = all_val[:: max(1, len(all_val) // n_probe)][:n_probe]
    tokens_per_step = global_batch * args.seq_len
    flops_per_token = train_flops_per_token(model.config, args.seq_len)
    peak = matmul_flops_per_s(device, compute) if d.main else 0.0
    if d.main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"model {model.config.num_parameters() / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable) | "
            f"train {len(prepared.train_stream):,} tokens, val {len(prepared.val_stream):,} "
            f"(probe {sum(len(w[1]) for w in probe):,}) | {tokens_per_step:,} tokens/step | "
            f"{d.world} x {device} {dtype_name}{', compiled' if args.compile else ''}, "
            f"{torch.get_num_threads()} threads | matmul {peak / 1e9:,.1f} GFLOP/s measured",
            flush=True,
        )

    def validate(windows: list[tuple[Tensor, Tensor]]) -> tuple[float, int]:
        nats, count = stream_nats(model, windows[d.rank :: d.world], args.batch_size, device, compute)
        total, n = d.all_sum([nats, float(count)], device)
        return total, int(n)

    def checkpoint() -> None:
        rng = rng_tensors(d, device)
        if d.main:
            meta = {"args": vars(args), "step": step, "elapsed": elapsed, "best_val_loss": best}
            meta |= {"bad_evals": bad_evals, "data": batches.state_dict(), "rng": rng}
            save_state(out / STATE_DIR, model, out, opt, meta)

    save_every = args.save_interval or args.eval_interval
    loop_start = time.perf_counter() - elapsed
    last_log, last_step, evaluated_at, reason = time.perf_counter(), step, -1, ""
    while True:
        elapsed = d.from_main(time.perf_counter() - loop_start, device)
        if args.max_steps is not None and step >= args.max_steps:
            reason = "max steps"
            break
        if args.time_budget is not None and elapsed >= args.time_budget:
            reason = "time budget"
            break
        progress = max(
            step / args.max_steps if args.max_steps else 0.0,
            elapsed / args.time_budget if args.time_budget else 0.0,
        )
        lr = lr_at(args, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        micro = batches.next_step(d.rank, d.world, args.batch_size)
        step_loss = torch.zeros((), device=device)
        for i, (inputs, targets) in enumerate(micro):
            sync = ddp is None or i == len(micro) - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():  # type: ignore[union-attr]
                loss = net(inputs.to(device), targets.to(device)) / len(micro)
                loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_interval == 0:
            (mean_loss,) = d.all_sum([step_loss.item() / d.world], device)
            now = time.perf_counter()
            rate = (step - last_step) * tokens_per_step / (now - last_log)
            last_log, last_step = now, step
            if d.main:
                mfu = rate * flops_per_token / (d.world * peak)
                record = {"step": step, "loss": mean_loss, "lr": lr, "tokens_per_s": rate, "mfu": mfu}
                line = f"step {step} | loss {mean_loss:.4f} | lr {lr:.2e} | {rate:,.0f} tok/s | MFU {mfu:.1%}"
                log(out, record | {"elapsed": elapsed}, f"{line} | {elapsed / 60:.1f} min")
        if step % args.eval_interval == 0:
            best, bad_evals = _eval_and_keep(args, out, model, validate(probe), step, best, bad_evals, d)
            evaluated_at = step
            last_log = time.perf_counter()
        if step % save_every == 0:
            checkpoint()
        if args.patience and bad_evals >= args.patience:
            reason = f"early stop: no improvement in {args.patience} evals"
            break
    if evaluated_at != step:
        best, bad_evals = _eval_and_keep(args, out, model, validate(probe), step, best, bad_evals, d)
    checkpoint()
    checksums = [
        t.item() for t in d.gather(torch.tensor([param_checksum(model)], dtype=torch.float64), device)
    ]
    # Rank 0's saved weights, sent to every rank: the final figures are of exactly what was shipped.
    shipped = load_model(out, dtype=torch.float32, device=device) if d.main else Transformer(model.config)
    shipped.to(device)
    d.tensors_from_main(list(shipped.state_dict().values()))
    nats, count = d.all_sum(
        list(stream_nats(shipped, all_val[d.rank :: d.world], args.batch_size, device, compute)), device
    )
    final = {
        "final": True, "step": step, "stop_reason": reason, "val_loss": nats / count,
        "val_perplexity": math.exp(nats / count), "val_bpc": nats / math.log(2) / prepared.val_chars,
        "train_elapsed": elapsed, "wall_time": time.perf_counter() - wall_start, "param_checksums": checksums,
        "dtype": dtype_name, "compile": bool(args.compile), "matmul_flops_per_s": peak,
        "flops_per_token": flops_per_token,
    }  # fmt: skip
    if d.main and args.sample_tokens > 0:
        torch.manual_seed(args.seed)
        ids = [tokenizer.eos_token_id, *tokenizer.encode(prepared.sample_prompt)]
        with autocast(device, compute):
            sample = shipped.generate(
                torch.tensor([ids], device=device), args.sample_tokens, temperature=0.8, top_k=40
            )
        final["sample_prompt"] = prepared.sample_prompt
        final["sample"] = tokenizer.decode(sample[0, 1:].tolist())
    if d.main:
        line = (
            f"done ({reason}) at step {step}: val loss {final['val_loss']:.4f}, "
            f"perplexity {final['val_perplexity']:.2f}, {final['val_bpc']:.4f} bits/char"
        )
        log(out, final, f"{line}\n{final.get('sample', '')}")
    return final


def _eval_and_keep(
    args: argparse.Namespace,
    out: Path,
    model: Transformer,
    result: tuple[float, int],
    step: int,
    best: float,
    bad_evals: int,
    d: Dist,
) -> tuple[float, int]:
    """Log validation loss; write the servable checkpoint when it improved. Returns (best, bad_evals)."""
    val_loss = result[0] / result[1]
    improved = val_loss < best
    # A resumed run writing to a new directory has no servable weights there until it saves some.
    if d.main and (improved or not (out / WEIGHTS_FILE).exists()):
        save_model(model, out, dtype=DTYPES[args.save_dtype])
    if d.main:
        record = {"step": step, "val_loss": val_loss, "val_perplexity": math.exp(val_loss), "saved": improved}
        log(out, record, f"step {step} | val loss {val_loss:.4f} | ppl {math.exp(val_loss):.2f}")
    return (val_loss, 0) if improved else (best, bad_evals + 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
