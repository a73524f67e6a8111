"""Turns a scheduled step into one batched forward and returns the logits to sample from.

Two paths (gpt-fast's prefill/decode split):
- the decode fast path: a step where every sequence computes its one last token runs one fixed-shape
  function of the persistent `InputBatch`, padded to a bucket of 1, 2, 4, ... rows and compiled whole
  per bucket (`torch.compile(fullgraph=True, dynamic=False)`; CUDA graphs on CUDA) at start-up;
- the general path, eager: prefill chunks and mixed steps, laid out from the sequences each step.
  Decode rows still attend through the paged op; each prefill chunk is an attention group of its own.
Only the last computed token of a sequence that has caught up gets logits, and, for a sequence
that scores its prompt (`prompt_logprobs`), the prompt positions it computes: in the same forward.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from model.kernels import load_cpu_kernels
from model.transformer import AttentionGroup, CacheBatch, DecodeRows, KVCache, Transformer
from server.engine.input_batch import InputBatch
from server.engine.sampler import greedy_picks
from server.engine.scheduler import ScheduledStep
from server.engine.sequence import Sequence

log = logging.getLogger("server.engine")


@dataclass
class PromptLogits:
    """A sequence's logits at the prompt positions computed this step: row j scores token `first + 1 + j`."""

    seq: Sequence
    first: int
    logits: Tensor


class StepLogits(NamedTuple):
    """What a step's forward gives the sampler."""

    ready: list[Sequence]
    """The sequences that caught up (their last token was computed), in row order."""
    logits: Tensor | None
    """A row per ready sequence (with proposals, 1 + len(proposal) rows); None if none is ready."""
    picks: Tensor | None
    """`greedy_picks(logits)` when the compiled decode step computed them with the logits."""
    prompt: list[PromptLogits]


PromptRows = list[tuple[Sequence, int, list[int]]]
"""Per sequence scoring its prompt: the first position computed and the flat rows holding them."""


def decode_buckets(max_num_seqs: int, one_row: bool = True) -> list[int]:
    """Batch sizes with a compiled decode graph: powers of two from 1 (2 without `one_row`) up to the
    first >= max_num_seqs.

    Every bucket computes a row alike, bit for bit, because the graphs round where eager rounds
    (`emulate_precision_casts`, see `ModelRunner._compile`): without it, inductor fused a residual add
    into the next norm and, in the one-row graph only, squared the unrounded float32 sum where the
    larger buckets read back the bfloat16 one. A batch-1 step then pads nothing: on a CPU with bfloat16
    dot products a second row costs 1.3-1.5x the projections of one. CUDA's graphs (`mode=
    "reduce-overhead"`, which takes no options) keep the two-row start.
    """
    smallest = 0 if one_row else 1
    return [2**i for i in range(smallest, max(smallest, math.ceil(math.log2(max_num_seqs))) + 1)]


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        block_size: int,
        sink_slot: int,
        max_num_seqs: int,
        max_model_len: int,
        device: torch.device,
        deterministic: bool,
        enforce_eager: bool,
    ) -> None:
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.device = device
        self.deterministic = deterministic
        self.dtype = model.dtype
        self.packed_weights = device.type == "cpu" and load_cpu_kernels() and model.use_serving_linears()
        self.buckets = decode_buckets(max_num_seqs, one_row=device.type != "cuda")
        self.fast_path = not (enforce_eager or deterministic)
        self.input_batch = InputBatch(
            self.buckets[-1], -(-max_model_len // block_size), block_size, sink_slot, device
        )
        self._decode: Callable[..., tuple[Tensor, Tensor]] = self._decode_forward
        if self.fast_path:
            self._decode = self._compile(self._decode_forward)

    @property
    def path(self) -> str:
        """What runs a decode step, for the start-up line."""
        packed = ", projections on packed weights" if self.packed_weights else ""
        if not self.fast_path:
            return "eager" + (" (deterministic)" if self.deterministic else "") + packed
        graphs = "CUDA graphs" if self.device.type == "cuda" else "inductor"
        return f"compiled decode ({graphs}, buckets {','.join(map(str, self.buckets))}){packed}"

    def _compile(self, fn: types.MethodType) -> Callable[..., tuple[Tensor, Tensor]]:
        # Dynamo keeps graphs per code object and, on every call, finds one by evaluating its guards:
        # about 860 for the shipped model (each module's type, hooks and parameters). This runner's
        # decode function gets a code object of its own, so its graphs (one per bucket: its recompile
        # limit) only ever serve its own model and cache, which never change.
        own = types.MethodType(
            types.FunctionType(fn.__func__.__code__.replace(), fn.__func__.__globals__, fn.__name__), self
        )
        if self.device.type == "cuda":
            # The cache is written in place by every graph: static addresses let CUDA graphs keep it.
            for layer in self.cache:
                for tensor in layer:
                    torch._dynamo.mark_static_address(tensor)
            return torch.compile(
                own, fullgraph=True, dynamic=False, mode="reduce-overhead", recompile_limit=len(self.buckets)
            )
        # No freezing: the projections and attention are our own ops, so inductor has no weights to
        # prepack, and freezing would bypass its on-disk cache (start-up measured 18 s vs 11 s warm).
        # Static shapes: one graph per bucket measured faster than one dynamic graph (17 vs 25 ms/step).
        # Only the guards on tensors that are not parameters (the inputs, whose shapes tell the buckets
        # apart, the cache and the rotary tables) are kept. The lookup tries the buckets' graphs in
        # turn, so larger buckets gained more: shipped model, bfloat16, two alternating runs each,
        # 198-202 against 191-194 tok/s at batch 1 and 1,003 against 920 at batch 8 (`bench.engine`).
        # (On CUDA, where `mode` excludes `options`, dynamo's default guards stay: not measured there.)
        # Those guards check every input's shape and strides; the generated wrapper checked them again,
        # and each output of our ops (whose fake bodies give their real layouts), with about 90 Python
        # calls a step (0.15 ms at any batch size).
        # Intermediates are rounded to the model's dtype wherever eager stores them, so that every
        # bucket computes a row alike (see `decode_buckets`); no cost measured at 8 and 32 rows.
        # The generated wrapper is C++ (`cpp_wrapper`): our ops and the fused kernels are called with no
        # Python between them. Once the projections were packed, that Python was a fifth of a batch-1
        # step: shipped model, bfloat16, 0.63-0.80 against 0.84-1.03 ms a step; a cold compile costs
        # more (six buckets of the shipped model: 53 s), a warm start the same (5-9 s).
        options = {
            "guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe,
            "size_asserts": False,
            "emulate_precision_casts": True,
            "cpp_wrapper": True,
        }
        return torch.compile(
            own, fullgraph=True, dynamic=False, options=options, recompile_limit=len(self.buckets)
        )

    def warm_up(self, progress: Callable[[str], None]) -> None:
        """Compile (or load from the on-disk cache) every decode bucket, on padding rows only."""
        if not self.fast_path:
            return
        ib = self.input_batch
        for rows in self.buckets:
            progress(f"compiling the decode step for {rows} row{'s' * (rows > 1)}")
            with torch.inference_mode():
                ib.prepare_decode(rows)
                self._decode(*ib.device_tensors(rows))

    def _decode_forward(
        self, tokens: Tensor, positions: Tensor, slots: Tensor, tables: Tensor, lens: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The logits of every row, and the sampler's greedy picks from them (see `greedy_picks`)."""
        decode = DecodeRows(slots, tables, lens, self.block_size)
        logits = self.model(tokens, positions, self.cache, CacheBatch(slots[:0], [], decode))
        return logits, greedy_picks(logits)

    @torch.inference_mode()
    def execute(self, step: ScheduledStep, proposals: list[list[int]] | None = None) -> StepLogits:
        """Run the step; return the sequences that caught up (in row order), their logits, and the
        logits of the prompt positions computed for sequences that score their prompt.

        With `proposals` (a decode-only step's, per sequence in step order), the sequences come back in
        step order with 1 + len(proposal) rows of logits each: row j scores the token after proposal j.
        """
        if proposals is not None:
            return self._execute_verify(step, proposals)
        if self.deterministic:
            return self._execute_one_by_one(step)
        if self.fast_path and step.is_decode_only and all(s.num_missing_tokens == 0 for s in step.sequences):
            return self._execute_decode(step)
        return self._execute_general(step)

    def _execute_decode(self, step: ScheduledStep) -> StepLogits:
        ib = self.input_batch
        ib.update(step.sequences)
        n = len(ib.seqs)
        rows = next(b for b in self.buckets if b >= n)
        ib.prepare_decode(rows)
        logits, picks = self._decode(*ib.device_tensors(rows))
        # Every row computes its last token: no prompt position.
        return StepLogits(list(ib.seqs), logits[:n], picks[:, :n], [])

    def _execute_verify(self, step: ScheduledStep, proposals: list[list[int]]) -> StepLogits:
        """Speculative verification as a decode step of more rows, through the same compiled buckets."""
        ib = self.input_batch
        need = len(step) + sum(map(len, proposals))
        rows = next(b for b in self.buckets if b >= need)
        ib.prepare_verify(step.sequences, proposals, rows)
        logits, picks = self._decode(*ib.device_tensors(rows))
        return StepLogits(list(step.sequences), logits[:need], picks[:, :need], [])

    # -- the general path --------------------------------------------------------------------------

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _build(
        self, seqs: list[Sequence], counts: list[int]
    ) -> tuple[Tensor, Tensor, CacheBatch, list[int], PromptRows]:
        """Flat tokens, positions and the CacheBatch for `seqs` (decodes must come first)."""
        as_tensor = lambda xs, dtype=torch.long: torch.tensor(xs, dtype=dtype, device=self.device)  # noqa: E731
        arange = torch.arange
        tokens: list[int] = []
        positions: list[int] = []
        writes: list[int] = []
        groups: list[AttentionGroup] = []
        last_rows: list[int] = []
        prompt_rows: PromptRows = []
        num_decodes = sum(1 for n in counts if n == 1)
        decode = None
        if num_decodes:
            decodes = seqs[:num_decodes]
            ends = [s.num_computed_tokens for s in decodes]
            tokens = [s.token_ids[e - 1] for s, e in zip(decodes, ends, strict=True)]
            positions = [e - 1 for e in ends]
            width = -(-max(ends) // self.block_size)
            tables = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in decodes]
            slots = [self._slots(s.block_table, e - 1, e)[0] for s, e in zip(decodes, ends, strict=True)]
            decode = DecodeRows(
                as_tensor(slots),
                as_tensor(tables, torch.int32),
                as_tensor(ends, torch.int32),
                self.block_size,
            )
            last_rows.extend(range(num_decodes))
            for row, (s, e) in enumerate(zip(decodes, ends, strict=True)):
                if scored := s.prompt_logit_positions(e - 1, e):  # a one-token prompt chunk
                    prompt_rows.append((s, scored.start, [row]))
        for s, n in zip(seqs[num_decodes:], counts[num_decodes:], strict=True):
            kv_len = s.num_computed_tokens
            start = kv_len - n
            first = len(tokens)
            tokens.extend(s.token_ids[start:kv_len])
            positions.extend(range(start, kv_len))
            writes.extend(self._slots(s.block_table, start, kv_len))
            read = as_tensor(self._slots(s.block_table, 0, kv_len))
            q_pos = arange(start, kv_len, device=self.device)
            visible = arange(kv_len, device=self.device)[None, :] <= q_pos[:, None]
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~visible, float("-inf"))  # additive: SDPA would convert a boolean per layer
            groups.append(AttentionGroup(first, 1, n, kv_len, read, mask[None, None]))
            last_rows.append(len(tokens) - 1)
            if scored := s.prompt_logit_positions(start, kv_len):
                prompt_rows.append((s, scored.start, [first + p - start for p in scored]))
        batch = CacheBatch(write_slots=as_tensor(writes), groups=groups, decode=decode)
        return as_tensor(tokens), as_tensor(positions), batch, last_rows, prompt_rows

    def _forward(self, seqs: list[Sequence], counts: list[int]) -> StepLogits:
        """One forward over `seqs`; logits for those that caught up, then for the prompt positions scored."""
        tokens, positions, batch, last_rows, prompt_rows = self._build(seqs, counts)
        ready = [i for i, s in enumerate(seqs) if s.num_missing_tokens == 0]
        rows = [last_rows[i] for i in ready] + [r for _, _, scored in prompt_rows for r in scored]
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        logits = self.model(tokens, positions, self.cache, batch, logits_indices=idx)
        prompt, at = [], len(ready)
        for seq, first, scored in prompt_rows:
            prompt.append(PromptLogits(seq, first, logits[at : at + len(scored)]))
            at += len(scored)
        return StepLogits([seqs[i] for i in ready], (logits[: len(ready)] if ready else None), None, prompt)

    def _execute_general(self, step: ScheduledStep) -> StepLogits:
        # Decodes first, then prefill chunks: the order the flat batch lays them out.
        order = sorted(range(len(step)), key=lambda i: step.num_tokens[i] != 1)
        return self._forward([step.sequences[i] for i in order], [step.num_tokens[i] for i in order])

    def _execute_one_by_one(self, step: ScheduledStep) -> StepLogits:
        """Batch-invariant mode: each sequence runs alone, so its numbers never depend on the batch."""
        ready: list[Sequence] = []
        logits: list[Tensor] = []
        prompt: list[PromptLogits] = []
        for seq, n in zip(step.sequences, step.num_tokens, strict=True):
            caught_up, out, _, scored = self._forward([seq], [n])
            ready += caught_up
            logits += [out] if out is not None else []
            prompt += scored
        return StepLogits(ready, (torch.cat(logits) if logits else None), None, prompt)
