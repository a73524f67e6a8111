"""Decode throughput of our engine against transformers, llama.cpp and the machine's roofline.

One run, one machine, one set of weights: our LLMEngine, Hugging Face `generate()` on the same
checkpoint directory in the same dtype, llama.cpp's llama-batched-bench on a GGUF converted from it
(where llama.cpp is built, see --llamacpp), and the floor a decode step cannot beat here
(bench/roofline.py). Run from the repository root, for example:

    .venv/bin/python -m bench.engine --shape 110m --batch-sizes 1,8,32 --threads 2 --json out.json
    .venv/bin/python -m bench.engine --shape 135m-deep --long-context   # one 4,096-token prompt, 64 new

`--profile` instead breaks our decode step down (scheduler, runner._build, forward ops, sampler).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from torch import Tensor

import server.engine.core as engine_module
from bench.roofline import (
    Machine,
    linear_weights,
    matmul_step_seconds,
    measure_machine,
    roofline,
    step_cost,
)
from model.checkpoint import load_config, load_model, save_model
from model.config import ModelConfig
from model.dtypes import QUANTIZATIONS
from model.tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer
from model.transformer import Transformer
from server.engine.config import EngineConfig
from server.engine.core import LLMEngine
from server.engine.outputs import Timings
from server.engine.params import SamplingParams
from server.engine.sequence import Request

DEFAULT_MODEL = Path("weights/default")
LLAMACPP_SCRIPT = Path("/work/shared/anchors/llamacpp.sh")
GGUF_TYPES = {"float32": "f32", "bfloat16": "f16"}
"""GGUF type per dtype: llama.cpp's 16-bit anchor is f16, as in the README's earlier bf16 comparison."""
LONG_CONTEXT = {"batch_sizes": "1", "prompt_tokens": 4096, "new_tokens": 64}
HF_METHOD = (
    "transformers: time(generate(max_new_tokens=N)) - time(generate(max_new_tokens=1)) "
    "for B*(N-1) tokens (prefill subtracted)"
)
OURS_METHOD = (
    "ours: B*(N-1) tokens / wall time of the steps after every sequence has its first token "
    "(prefill excluded); ms/step is the median decode step"
)
LLAMACPP_METHOD = (
    "llama.cpp: llama-batched-bench S_TG (B*N tokens / time of the N decode steps after the prompts) "
    "and T_PP (the B prompts), separate sequences, same P, N, B and threads"
)

# Measured earlier on this machine kind: 2 threads, prompt 128, 128 generated, float32, decode tokens/s.
REFERENCE: dict[str, dict[str, Any]] = {
    "~110M": {
        "shape": (768, 12),
        "figures": {
            1: {"transformers": 43, "llama.cpp": 61, "roofline": 80},
            8: {"transformers": 149, "llama.cpp": 236, "roofline": 600},
            32: {"transformers": 356, "llama.cpp": 342, "roofline": 1400},
        },
    },
    "~14M": {
        "shape": (384, 6),
        "figures": {
            1: {"transformers": 243, "llama.cpp": 745},
            32: {"transformers": 1118, "llama.cpp": 1520},
        },
    },
}


# -- the model under test ----------------------------------------------------------------------


def gguf_type_for(args: argparse.Namespace) -> str:
    """llama.cpp's anchor for our run: q8_0 (its int8, a scale per 32 weights) beside our int8."""
    return "q8_0" if args.quantization == "int8" else GGUF_TYPES[args.dtype]


def pad_tokenizer(directory: Path, vocab_size: int) -> None:
    """Add placeholder special tokens up to `vocab_size`: every id a random model emits must detokenize."""
    tok = HFTokenizer.from_file(str(directory / TOKENIZER_FILE))
    have = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(f"<|bench_pad_{i}|>", special=True) for i in range(vocab_size - have)])
    tok.save(str(directory / TOKENIZER_FILE))


@dataclass(frozen=True)
class Shape:
    """A random-weight Llama shape: the knobs that set a decode step's bytes and op count."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool


SHAPES = {
    "110m": Shape(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=32000, tied=False),
    # SmolLM-135M's shape: narrow and deep, so per-layer overhead weighs more than in 110m.
    "135m-deep": Shape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True),
}


def build_random(directory: Path, shape: Shape, seed: int = 0) -> Path:
    """A Llama of `shape` with random weights (float32 on disk) and a tokenizer padded to its vocab."""
    if (DEFAULT_MODEL / TOKENIZER_FILE).is_file():
        Tokenizer.load(DEFAULT_MODEL).save(directory)
    else:  # decode runs on token ids: any small tokenizer will do
        train_tokenizer([inspect.getsource(json.decoder), inspect.getsource(argparse)], 512).save(directory)
    tokenizer = Tokenizer.load(directory)
    vocab = max(shape.vocab, tokenizer.vocab_size)
    pad_tokenizer(directory, vocab)
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,  # room for --long-context
        tie_word_embeddings=shape.tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Transformer(config)
    model.init_weights(seed=seed)
    save_model(model, directory, dtype=torch.float32)
    return directory


def build_random_110m(directory: Path) -> Path:
    """The 110m shape, for bench/serve and bench/http_overhead."""
    return build_random(directory, SHAPES["110m"])


def reference_for(config: ModelConfig, dtype: str) -> tuple[str | None, dict[int, dict[str, float]]]:
    """The reference figures for this model's shape (float32 only, as they were measured)."""
    for name, ref in REFERENCE.items():
        if dtype == "float32" and ref["shape"] == (config.hidden_size, config.num_hidden_layers):
            return name, ref["figures"]
    return None, {}


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> Tensor:
    """Distinct random prompts: no two share a prefix, so prefix caching cannot shortcut the prefill."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- our engine --------------------------------------------------------------------------------


@dataclass
class OursResult:
    tokens_per_s: float
    step_ms_median: float
    step_ms_p90: float
    tokens_per_s_at_median_step: float
    """batch / median step: less sensitive than the wall-time figure to a few preempted steps."""
    decode_s: float
    decode_tokens: int
    decode_steps: int
    min_rows: int
    """Fewest sequences in a timed step: equals the batch size when all decode in lockstep."""
    prefill_s: float


def make_engine(model_dir: Path, args: argparse.Namespace, max_batch: int) -> LLMEngine:
    """One engine for all batch sizes; a prefill budget that admits the whole batch in the first step."""
    config = load_config(model_dir)
    block = 16
    per_seq = -(-(args.prompt_tokens + args.new_tokens) // block) + 1
    kv_tokens = max(max_batch * per_seq * block, config.max_position_embeddings)
    return LLMEngine(
        EngineConfig(
            model=model_dir,
            dtype=args.dtype,
            quantization=args.quantization,
            kv_cache_tokens=kv_tokens,
            block_size=block,
            max_num_seqs=max_batch,  # also the largest compiled decode bucket
            prefill_chunk_tokens=max(256, max_batch * args.prompt_tokens),
            num_threads=args.threads,
            enforce_eager=args.enforce_eager,
        )
    )


def submit(engine: LLMEngine, prompts: Tensor, new_tokens: int) -> list[Request]:
    """Greedy, ignore_eos requests built the way AsyncEngine.submit builds them (no event sink)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = []
    for i, ids in enumerate(prompts.tolist()):
        request = Request(
            request_id=f"bench-{i}",
            prompt_ids=ids,
            params=params,
            max_tokens=engine.validate(ids, params),
            sink=None,
            timings=Timings(arrival=time.monotonic()),
        )
        engine.add(request)
        requests.append(request)
    return requests


def run_ours(engine: LLMEngine, prompts: Tensor, new_tokens: int) -> tuple[OursResult, list[list[int]]]:
    """Prefill untimed (until every sequence has a token), then time each remaining step."""
    requests = submit(engine, prompts, new_tokens)
    start = time.perf_counter()
    while any(r.timings.first_token is None for r in requests):
        engine.step()
    prefill_s = time.perf_counter() - start
    first_tokens = sum(r.completion_tokens for r in requests)
    steps: list[float] = []
    rows: list[int] = []
    decode_start = time.perf_counter()
    while engine.has_work:
        rows.append(len(engine.scheduler.running))
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    decode_s = time.perf_counter() - decode_start
    tokens = sum(r.completion_tokens for r in requests) - first_tokens
    steps_ms = sorted(s * 1e3 for s in steps) or [float("nan")]
    result = OursResult(
        tokens_per_s=tokens / decode_s if decode_s > 0 else float("nan"),
        step_ms_median=statistics.median(steps_ms),
        step_ms_p90=steps_ms[min(len(steps_ms) - 1, int(0.9 * len(steps_ms)))],
        tokens_per_s_at_median_step=len(requests) / statistics.median(steps_ms) * 1e3,
        decode_s=decode_s,
        decode_tokens=tokens,
        decode_steps=len(steps),
        min_rows=min(rows, default=0),
        prefill_s=prefill_s,
    )
    return result, [r.sequences[0].output_ids for r in requests]


# -- transformers ------------------------------------------------------------------------------


@dataclass
class HFResult:
    tokens_per_s: float
    full_s: float
    prefill_s: float
    decode_s: float
    decode_tokens: int


def load_hf(model_dir: Path, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


def hf_generate(model: Any, prompts: Tensor, new_tokens: int) -> Tensor:
    out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    if out.shape[1] != prompts.shape[1] + new_tokens:
        got = out.shape[1] - prompts.shape[1]
        raise RuntimeError(f"transformers generated {got} tokens, not {new_tokens}")
    return out[:, prompts.shape[1] :]


def run_hf(model: Any, prompts: Tensor, new_tokens: int, repeats: int) -> HFResult:
    """Time generate(N) whole, subtract a generate(1) call (the prefill); the best of `repeats` each."""

    def timed(n: int) -> float:
        start = time.perf_counter()
        hf_generate(model, prompts, n)
        return time.perf_counter() - start

    with torch.inference_mode():
        hf_generate(model, prompts, 2)  # warm-up
        full = min(timed(new_tokens) for _ in range(repeats))
        prefill = min(timed(1) for _ in range(repeats + 1))
    decode = full - prefill
    tokens = prompts.shape[0] * (new_tokens - 1)
    return HFResult(tokens / decode if decode > 0 else float("nan"), full, prefill, decode, tokens)


# -- llama.cpp ---------------------------------------------------------------------------------


@dataclass
class LlamaCppResult:
    tokens_per_s: float
    """S_TG: B*N generated tokens over the N decode steps' time."""
    decode_s: float
    prefill_s: float
    """T_PP: the B prompts, from nothing to their logits (at batch 1, the time to first token)."""
    prefill_tokens_per_s: float


def default_llamacpp_dir() -> Path:
    """Where the anchors script puts the binaries: $LLAMACPP_DIR/bin, else its default cache."""
    root = os.environ.get("LLAMACPP_DIR")
    return Path(root) / "bin" if root else Path.home() / ".cache" / "llamacpp-anchor" / "bin"


def parse_batched_bench(text: str) -> dict[int, LlamaCppResult]:
    """llama-batched-bench's markdown table (PP, TG, B, N_KV, T_PP s, S_PP t/s, T_TG s, S_TG t/s, ...)."""
    header: list[str] | None = None
    rows: dict[int, LlamaCppResult] = {}
    for line in text.splitlines():
        if not line.lstrip().startswith("|") or set(line.strip()) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
        elif header is not None:
            row = dict(zip(header, cells, strict=True))
            rows[int(row["B"])] = LlamaCppResult(
                tokens_per_s=float(row["S_TG t/s"]),
                decode_s=float(row["T_TG s"]),
                prefill_s=float(row["T_PP s"]),
                prefill_tokens_per_s=float(row["S_PP t/s"]),
            )
    return rows


def run_llamacpp(model_dir: Path, args: argparse.Namespace) -> tuple[dict[int, LlamaCppResult], list[str]]:
    """Convert the checkpoint to GGUF in a temp dir, run llama-batched-bench on it once for every B."""
    gguf_type = gguf_type_for(args)
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        gguf = Path(tmp) / f"model-{gguf_type}.gguf"
        convert = [
            *("bash", str(args.llamacpp_script), "convert"),
            str(model_dir.resolve()),
            str(gguf),
            gguf_type,
        ]
        print(f"llama.cpp: {' '.join(convert)}", file=sys.stderr, flush=True)
        done = subprocess.run(convert, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not gguf.is_file():
            log = gguf.with_name(gguf.name + ".log")
            text = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise SystemExit(f"llama.cpp: GGUF conversion failed:\n{done.stderr[-2000:]}\n{text}")
        # Separate sequences each need P + N cache cells; llama.cpp splits the context evenly among them.
        context = max(args.batch_sizes) * (args.prompt_tokens + args.new_tokens) + 512
        command = [
            *(str(args.llamacpp / "llama-batched-bench"), "-m", str(gguf)),
            *("-npp", str(args.prompt_tokens), "-ntg", str(args.new_tokens)),
            *("-npl", ",".join(map(str, args.batch_sizes)), "-c", str(context)),
            *("-b", "2048", "-ub", "512", "-t", str(args.threads)),
        ]
        print(f"llama.cpp: {' '.join(command)}", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
    rows = parse_batched_bench(done.stdout)
    missing = [b for b in args.batch_sizes if b not in rows]
    if done.returncode != 0 or missing:
        raise SystemExit(
            f"llama.cpp: llama-batched-bench exited {done.returncode}, no result for batch sizes "
            f"{missing}:\n{done.stderr[-3000:]}"
        )
    command[command.index("-m") + 1] = f"<the model as {gguf_type} GGUF>"
    return rows, command


# -- bfloat16 agreement ------------------------------------------------------------------------


def agreement(ours: list[list[int]], ref: list[list[int]]) -> dict[str, Any]:
    """Greedy outputs diverge for good after the first differing token, so count the common prefix."""
    prefixes = []
    for a, b in zip(ours, ref, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefixes.append(n)
    total = sum(len(b) for b in ref)
    return {
        "sequences_equal": sum(a == b for a, b in zip(ours, ref, strict=True)) / len(ref),
        "token_match_rate": sum(prefixes) / total,
        "first_divergence": [p if p < len(b) else None for p, b in zip(prefixes, ref, strict=True)],
    }


def check_bf16(engine: LLMEngine, hf_model: Any, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    """Our batched, cached greedy decode against full-recompute Transformer.generate (and HF) in bf16."""
    prompt_len, new = min(args.prompt_tokens, 32), min(args.new_tokens, 32)
    prompts = random_prompts(args.check_prompts, prompt_len, vocab, seed=10_000)
    _, ours = run_ours(engine, prompts, new)
    with torch.inference_mode():
        ref = [engine.model.generate(p[None], new)[0, prompt_len:].tolist() for p in prompts]
    report: dict[str, Any] = {
        "prompts": len(prompts),
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "vs_transformer_generate_bf16": agreement(ours, ref),
    }
    if hf_model is not None:
        with torch.inference_mode():
            hf = hf_generate(hf_model, prompts, new).tolist()
        report["vs_transformers_bf16"] = agreement(ours, hf)
        report["transformer_generate_vs_transformers_bf16"] = agreement(ref, hf)
    return report


# -- profile -----------------------------------------------------------------------------------


class PhaseTimer:
    """Wraps engine callables in wall-clock timers and profiler labels, without editing the engine."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            with torch.profiler.record_function(f"phase:{name}"):
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - start

        return timed


@contextlib.contextmanager
def phase_timers(engine: LLMEngine) -> Iterator[PhaseTimer]:
    """Time the step's phases; names the engine lacks (it is evolving) are skipped."""
    timer = PhaseTimer()
    # The compiled decode step as a whole (dynamo cannot trace a timer inside it), else the model.
    forward = (engine.runner, "_decode") if engine.runner.fast_path else (engine.model, "forward")
    patched = [
        (engine.scheduler, "schedule", "schedule"),
        (engine.runner, "execute", "execute"),
        (engine.runner, "_build", "_build"),
        (*forward, "forward"),
        (engine_module, "sample", "sample"),
        (engine, "_append", "_append"),
        (engine.blocks, "register_computed", "register_computed"),
    ]
    saved = []
    for obj, attr, label in patched:
        if hasattr(obj, attr):
            own = obj is engine_module or attr in vars(obj)
            saved.append((obj, attr, getattr(obj, attr), own))
            setattr(obj, attr, timer.wrap(label, getattr(obj, attr)))
    try:
        yield timer
    finally:
        for obj, attr, original, own in reversed(saved):
            if own:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)  # drop the instance attribute: the class's method shows through


OP_GROUPS = {
    "aten::linear": "matmul (linear)",
    "aten::scaled_dot_product_attention": "attention (sdpa)",
    "aten::index_select": "KV gather (index_select)",
    "aten::index_copy_": "KV write (index_copy_)",
    "aten::embedding": "embedding",
}


def op_breakdown(
    prof: torch.profiler.profile, steps: int
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Self CPU ms per step by (phase, outermost aten op), and aten calls per step by phase.

    Each op's self time counts once, under its outermost op. A phase label's own self time is
    Python running between ops; the number of aten calls is the unit of eager-mode overhead.
    """
    self_ms: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    calls: dict[str, float] = defaultdict(float)
    for event in prof.events():
        ms = event.self_cpu_time_total / 1e3 / steps
        if event.name.startswith("phase:"):
            self_ms[event.name.removeprefix("phase:")]["python (between ops)"] += ms
            continue
        root, phase = event, "step (outside phases)"
        node = event.cpu_parent
        while node is not None:
            if node.name.startswith("phase:"):
                phase = node.name.removeprefix("phase:")
                break
            root = node
            node = node.cpu_parent
        group = "ops" if phase != "forward" else OP_GROUPS.get(root.name, "other ops (rope, norms, cat, ...)")
        self_ms[phase][group] += ms
        calls[phase] += 1 / steps
    return {k: dict(v) for k, v in self_ms.items()}, dict(calls)


def profile_batch(engine: LLMEngine, batch: int, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Phase wall times over a plain decode run, then a torch.profiler pass over a few decode steps."""
    run_ours(engine, random_prompts(batch, args.prompt_tokens, vocab, seed=batch + 1), 4)  # warm-up
    prompts = random_prompts(batch, args.prompt_tokens, vocab, seed=batch + 2)
    requests = submit(engine, prompts, args.profile_steps * 3)
    while any(r.timings.first_token is None for r in requests):
        engine.step()
    with phase_timers(engine) as timer:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(args.profile_steps):
            engine.step()
        wall = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        phases = {k: v / args.profile_steps * 1e3 for k, v in timer.seconds.items()}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                engine.step()
    for r in requests:
        engine.abort(r)
    self_ms, calls = op_breakdown(prof, args.profile_steps)
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    return {
        "batch_size": batch,
        "steps": args.profile_steps,
        "context_tokens": args.prompt_tokens,
        "step_ms": wall / args.profile_steps * 1e3,
        "page_faults_per_step": faults / args.profile_steps,
        "phase_ms": phases,
        "profiled_self_ms": self_ms,
        "aten_calls_per_step": calls,
        "top_ops_self_ms": {e.key: e.self_cpu_time_total / 1e3 / args.profile_steps for e in top},
        "top_ops_calls": {e.key: e.count / args.profile_steps for e in top},
    }


def print_profile(p: dict[str, Any]) -> None:
    ph = p["phase_ms"]
    head = f"{p['step_ms']:.2f} ms/step, {p['page_faults_per_step']:.0f} page faults/step (wall, no profiler)"
    print(f"\n### batch {p['batch_size']}, context {p['context_tokens']}: {head}")
    nested = ph.get("_build", 0) + ph.get("forward", 0)
    rest = p["step_ms"] - sum(ph.get(k, 0) for k in ("schedule", "execute", "sample", "_append"))
    rest -= ph.get("register_computed", 0)
    print("| phase | ms/step |\n|---|---:|")
    for name, ms in [
        ("scheduler.schedule", ph.get("schedule", 0)),
        ("runner._build", ph.get("_build", 0)),
        ("model.forward", ph.get("forward", 0)),
        ("runner.execute, rest", ph.get("execute", 0) - nested),
        ("sampler.sample", ph.get("sample", 0)),
        ("engine._append (all rows)", ph.get("_append", 0)),
        ("blocks.register_computed", ph.get("register_computed", 0)),
        ("engine.step, rest", rest),
    ]:
        print(f"| {name} | {ms:.3f} |")
    print("\nself CPU ms/step under torch.profiler (profiler overhead included), aten calls/step:")
    print("| phase | group | ms/step |\n|---|---|---:|")
    for phase, groups in p["profiled_self_ms"].items():
        for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {phase} | {group} | {ms:.3f} |")
    print("aten calls per step:", {k: round(v) for k, v in p["aten_calls_per_step"].items()})
    print("\ntop ops by self CPU ms/step (calls/step):")
    for name, ms in p["top_ops_self_ms"].items():
        print(f"  {name:48s} {ms:8.3f}  ({p['top_ops_calls'][name]:.0f})")


# -- driver ------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or x != x else f"{x:,.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    cfg, machine = report["config"], report["machine"]
    llc = "unknown" if machine["llc_bytes"] is None else f"{machine['llc_bytes'] / 2**20:.0f} MiB"
    print(
        f"\n## Decode throughput: {cfg['model']} ({cfg['parameters'] / 1e6:.1f}M params, {cfg['dtype']}"
        f"{', ' + cfg['quantization'] + ' weights' if cfg.get('quantization') else ''}), "
        f"prompt {cfg['prompt_tokens']}, {cfg['new_tokens']} new tokens, {cfg['threads']} threads\n"
    )
    print(
        "| batch | ours tok/s | ours ms/step | transformers tok/s | llama.cpp tok/s | ours/transformers "
        "| ours/llama.cpp | non-matmul share | roofline tok/s | bound | ours/roofline "
        "| ref transformers | ref llama.cpp | ref roofline |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in report["results"]:
        hf, lcp, ref, ratio = r["transformers"], r["llama.cpp"], r["reference"] or {}, r["ratios"]
        print(
            f"| {r['batch_size']} | {fmt(r['ours']['tokens_per_s'])} | {fmt(r['ours']['step_ms_median'], 2)} "
            f"| {fmt(hf and hf['tokens_per_s'])} | {fmt(lcp and lcp['tokens_per_s'])} "
            f"| {fmt(ratio['ours_over_transformers'], 2)} | {fmt(ratio['ours_over_llamacpp'], 2)} "
            f"| {ratio['non_matmul_share']:.0%} | {fmt(r['roofline']['tokens_per_s'])} "
            f"| {r['roofline']['bound']} | {fmt(ratio['ours_over_roofline'], 2)} "
            f"| {fmt(ref.get('transformers'), 0)} | {fmt(ref.get('llama.cpp'), 0)} "
            f"| {fmt(ref.get('roofline'), 0)} |"
        )
    print(
        f"\n### Prefill: B prompts of {cfg['prompt_tokens']} tokens until each has a first token "
        "(seconds; at batch 1 the time to first token)\n"
    )
    print("| batch | ours s | transformers s | llama.cpp s | ours/llama.cpp |\n|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        ours_s = r["ours"]["prefill_s"]
        hf_s, lcp_s = (r[k] and r[k]["prefill_s"] for k in ("transformers", "llama.cpp"))
        print(
            f"| {r['batch_size']} | {fmt(ours_s, 3)} | {fmt(hf_s, 3)} | {fmt(lcp_s, 3)} "
            f"| {fmt(lcp_s and ours_s / lcp_s, 2)} |"
        )
    print(
        f"\nmachine: reading weights {machine['bandwidth_gbs']:.1f} GB/s (the roofline's bandwidth: the "
        f"faster of one-row float32 F.linear, {machine['read_gbs']:.1f}, and a sum, "
        f"{machine['sum_gbs']:.1f}, over {machine['streamed_bytes'] / 2**20:.0f} MiB; LLC {llc}), copy "
        f"{machine['copy_gbs']:.1f} GB/s; torch.mm {machine['matmul_gflops']:.0f} GFLOP/s "
        f"({machine['dtype']}, {machine['matmul_rows']} rows at the model's weight shapes)"
    )
    print(f"weights read per step: {cfg['weight_bytes_per_step'] / 1e6:.1f} MB")
    print("roofline step = max((weight bytes + KV bytes) / bandwidth, FLOPs / matmul rate), mean context")
    matmul_only = [
        f"B={r['batch_size']}: {r['matmul_only_step_ms']:.2f} ({r['ratios']['step_over_matmul_only']:.2f}x)"
        for r in report["results"]
    ]
    print(
        "matmul-only ms/step (each weight once through torch.mm at B rows), ours / it:",
        ", ".join(matmul_only),
    )
    print("non-matmul share = (ours median step - matmul-only step) / ours median step")
    for note in report["notes"]:
        print(f"- {note}")
    check = report.get("check_bf16")
    if check:
        print(
            f"\n### bfloat16 greedy agreement: {check['prompts']} prompts of {check['prompt_tokens']} "
            f"tokens, {check['new_tokens']} generated (token match = common prefix / tokens)\n"
        )
        print("| outputs compared | token match | sequences equal | first divergence |\n|---|---:|---:|---|")
        for key, label in (
            ("vs_transformer_generate_bf16", "ours vs Transformer.generate (full recompute)"),
            ("vs_transformers_bf16", "ours vs transformers generate()"),
            ("transformer_generate_vs_transformers_bf16", "Transformer.generate vs transformers"),
        ):
            if key in check:
                a = check[key]
                print(
                    f"| {label} | {a['token_match_rate']:.3f} | {a['sequences_equal']:.2f} "
                    f"| {a['first_divergence']} |"
                )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory")
    source.add_argument(
        "--shape", choices=SHAPES, help="build a random-weight model of this shape in a temp dir"
    )
    source.add_argument(
        "--random-110m", dest="shape", action="store_const", const="110m", help="--shape 110m"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="our engine with quantized weights (activations in --dtype); llama.cpp runs q8_0",
    )
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--long-context",
        action="store_true",
        help="defaults to one stream, a 4,096-token prompt and 64 new tokens (explicit flags still win)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per batch size; the best counts")
    p.add_argument("--enforce-eager", action="store_true", help="our engine without compiled decode steps")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    p.add_argument(
        "--llamacpp",
        type=Path,
        default=default_llamacpp_dir(),
        help="llama-batched-bench's directory (default: $LLAMACPP_DIR/bin or ~/.cache/llamacpp-anchor/bin)",
    )
    p.add_argument(
        "--llamacpp-script",
        type=Path,
        default=LLAMACPP_SCRIPT,
        help="the anchors script that converts to GGUF",
    )
    p.add_argument("--skip-llamacpp", action="store_true", help="do not run llama.cpp even where it is built")
    p.add_argument("--check-bf16", action="store_true", help="greedy agreement with a bf16 reference")
    p.add_argument("--check-prompts", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="profile our decode step instead of benchmarking")
    p.add_argument("--profile-steps", type=int, default=16)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.long_context:
        p.set_defaults(**LONG_CONTEXT)
        args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be positive")
    if min(args.prompt_tokens, args.threads, args.repeats, args.check_prompts, args.profile_steps) < 1:
        p.error("--prompt-tokens, --threads, --repeats, --check-prompts and --profile-steps must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (one prefill token, then decode)")
    if args.check_bf16 and args.dtype != "bfloat16":
        p.error("--check-bf16 needs --dtype bfloat16")
    if not args.shape and not (args.model / "config.json").is_file():
        p.error(f"{args.model} is not a checkpoint directory: pass --model DIR or --shape NAME")
    return args


def benchmark(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    config = load_config(model_dir)
    if args.prompt_tokens + args.new_tokens > config.max_position_embeddings:
        raise SystemExit(f"prompt + new tokens exceed the model's {config.max_position_embeddings} positions")
    llamacpp_found = (args.llamacpp / "llama-batched-bench").is_file() and args.llamacpp_script.is_file()
    run_anchor = llamacpp_found and not args.skip_llamacpp and not args.profile
    # First, so that a failed conversion costs seconds, not a whole run of ours.
    llamacpp, llamacpp_command = run_llamacpp(model_dir, args) if run_anchor else ({}, None)
    engine = make_engine(model_dir, args, max(args.batch_sizes))
    vocab = engine.tokenizer.vocab_size
    if args.profile:
        profiles = [profile_batch(engine, b, args, vocab) for b in args.batch_sizes]
        for p in profiles:
            print_profile(p)
        return {"config": vars(args) | {"model": str(model_dir)}, "profile": profiles}
    weights = linear_weights(load_model(model_dir, dtype=args.dtype))  # the engine may have packed its own
    element = weights[0].element_size()
    weight_element = 1 if args.quantization == "int8" else None
    machine: Machine = measure_machine(weights, args.threads)
    hf_model = None if args.skip_hf else load_hf(model_dir, args.dtype)
    ref_name, figures = reference_for(config, args.dtype)
    context = args.prompt_tokens + args.new_tokens / 2  # mean context over the decode
    results = []
    for batch in args.batch_sizes:
        warm_up = random_prompts(batch, args.prompt_tokens, vocab, seed=1000 * batch)
        run_ours(engine, warm_up, min(8, args.new_tokens))
        runs = []
        for i in range(args.repeats):  # fresh prompts each time: no prefix-cache hits
            prompts = random_prompts(batch, args.prompt_tokens, vocab, seed=1000 * batch + i + 1)
            runs.append(run_ours(engine, prompts, args.new_tokens)[0])
        ours = max(runs, key=lambda r: r.tokens_per_s)
        hf = None if hf_model is None else run_hf(hf_model, prompts, args.new_tokens, args.repeats)
        lcp = llamacpp.get(batch)
        roof = roofline(step_cost(config, element, batch, context, weight_element), machine, batch)
        matmul_ms = matmul_step_seconds(weights, batch) * 1e3
        results.append(
            {
                "batch_size": batch,
                "ours": asdict(ours),
                "transformers": hf and asdict(hf),
                "llama.cpp": lcp and asdict(lcp),
                "roofline": asdict(roof),
                "matmul_only_step_ms": matmul_ms,
                "ratios": {
                    "ours_over_transformers": hf and ours.tokens_per_s / hf.tokens_per_s,
                    "ours_over_llamacpp": lcp and ours.tokens_per_s / lcp.tokens_per_s,
                    "ours_over_roofline": ours.tokens_per_s / roof.tokens_per_s,
                    # Both measured here within seconds: the ratio survives a noisy machine best.
                    "step_over_matmul_only": ours.step_ms_median / matmul_ms,
                    "non_matmul_share": (ours.step_ms_median - matmul_ms) / ours.step_ms_median,
                },
                "reference": figures.get(batch),
            }
        )
        hf_text = f", transformers {hf.tokens_per_s:.1f}" if hf else ""
        lcp_text = f", llama.cpp {lcp.tokens_per_s:.1f}" if lcp else ""
        print(f"batch {batch}: ours {ours.tokens_per_s:.1f} tok/s{hf_text}{lcp_text}", file=sys.stderr)
    if llamacpp_command:
        llamacpp_note = f"{LLAMACPP_METHOD}: {' '.join(llamacpp_command)}"
    elif not llamacpp_found:
        llamacpp_note = f"llama.cpp: not found at {args.llamacpp} (or {args.llamacpp_script}); ratios omitted"
    else:
        llamacpp_note = "llama.cpp skipped (--skip-llamacpp)"
    notes = [
        OURS_METHOD + (f"; best of {args.repeats} runs" if args.repeats > 1 else ""),
        HF_METHOD if hf_model is not None else "transformers skipped (--skip-hf)",
        llamacpp_note,
    ]
    if ref_name:
        notes.append(f"ref: {ref_name} float32, 2 threads, prompt 128, 128 generated (measured earlier)")
    report = {
        "config": {
            "model": f"random-{args.shape}" if args.shape else str(model_dir),
            "parameters": engine.num_parameters,
            "dtype": args.dtype,
            "batch_sizes": args.batch_sizes,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "enforce_eager": args.enforce_eager,
            "llamacpp_gguf": gguf_type_for(args) if llamacpp_command else None,
            "quantization": args.quantization,
            "weight_bytes_per_step": step_cost(config, element, 1, context, weight_element).weight_bytes,
            "mean_context_tokens": context,
            "torch": torch.__version__,
            "transformers": None if hf_model is None else sys.modules["transformers"].__version__,
            "cpu": platform.processor() or platform.machine(),
            "reference_model": ref_name,
        },
        "machine": machine.to_json(),
        "results": results,
        "notes": notes,
        "check_bf16": check_bf16(engine, hf_model, vocab, args) if args.check_bf16 else None,
    }
    print_table(report)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model_dir = build_random(Path(tmp), SHAPES[args.shape]) if args.shape else args.model
        report = benchmark(model_dir, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
