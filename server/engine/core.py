"""The engine core: the step loop, synchronous and owned by one thread (no asyncio).

Schedule, run the model, sample, detokenize, and return what each request should hear. The async
facade in `async_engine.py` runs it on its own thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from model.checkpoint import GENERATION_CONFIG_FILE, load_generation_config, load_model
from model.quantization import check_quantization
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import BlockManager, allocate_cache, kv_bytes_per_token
from server.engine.outputs import (
    Delta,
    EngineError,
    EngineStats,
    Finished,
    StepStats,
    TokenLogprob,
    TopLogprob,
)
from server.engine.params import ParamError, SamplingParams
from server.engine.runner import ModelRunner, PromptLogits
from server.engine.sampler import NON_FINITE_LOGITS, SampleResult, SampleRow, sample, score, skip_draws
from server.engine.scheduler import Scheduler
from server.engine.sequence import Request, Sequence, Status
from server.engine.speculative import Speculator
from server.engine.structured import GrammarCompiler, describe_error

log = logging.getLogger("server.engine")

Output = tuple[Request, Delta | Finished | EngineError]


class LLMEngine:
    """Model, cache, scheduler and sampler behind `add`, `abort` and `step`. Not thread-safe."""

    def __init__(self, config: EngineConfig) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.config = config
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if config.device == "auto" else config.device)
        if config.quantization is not None:
            check_quantization(config.quantization, self.device)
        self.model = load_model(config.model, dtype=config.dtype, device=self.device)
        self.model_config = self.model.config
        self.dtype = self.model.dtype
        self.num_parameters = sum(p.numel() for p in self.model.parameters())  # before quantizing
        if config.quantization is not None:
            self.model.quantize_int8()
        self.tokenizer = Tokenizer.load(config.model)
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ValueError(
                f"{config.model}: tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                f"{self.model_config.vocab_size}"
            )
        generation = load_generation_config(config.model)
        self.eos_ids = set(self.model_config.eos_token_ids) | set(generation.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        follow = config.generation_config == "auto"
        self.sampling_defaults = generation.sampling if follow else {}
        """What requests that omit them sample with (the checkpoint's recommendation), checked here."""
        try:
            SamplingParams(**self.sampling_defaults)
        except ParamError as exc:
            raise ValueError(
                f"{config.model / GENERATION_CONFIG_FILE}: {exc} (--generation-config none serves the "
                "model without its recommended sampling values)"
            ) from None
        self.max_new_tokens = generation.max_new_tokens if follow else None
        """A cap on every request's max_tokens (vLLM's reading of generation_config's max_new_tokens)."""
        cap = {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}
        if recommended := {**self.sampling_defaults, **cap}:
            log.info(
                "start-up: %s recommends %s: requests that omit them get these (--generation-config none: "
                "the API's defaults)",
                GENERATION_CONFIG_FILE, ", ".join(f"{k}={v}" for k, v in recommended.items()),
            )  # fmt: skip
        limit = self.model_config.max_position_embeddings
        self.max_model_len = config.max_model_len or limit
        if not 0 < self.max_model_len <= limit:
            raise ValueError(
                f"--max-model-len must be in [1, {limit}] for this model, got {self.max_model_len}"
            )
        for name in ("block_size", "max_num_seqs", "prefill_chunk_tokens"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")

        per_token = kv_bytes_per_token(self.model_config, self.dtype)
        tokens = config.kv_cache_tokens or min(
            config.kv_cache_memory // per_token, config.max_num_seqs * self.max_model_len
        )
        num_blocks = tokens // config.block_size
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"a KV cache of {tokens} tokens cannot hold one sequence of max-model-len "
                f"{self.max_model_len}: raise --kv-cache-tokens or lower --max-model-len"
            )
        self.kv_capacity_tokens = num_blocks * config.block_size
        # Two extra blocks: block 0, the null block that padding reads, and a last one that padded
        # decode rows write to. Neither is ever handed out.
        cache = allocate_cache(
            self.model_config, self.kv_capacity_tokens + 2 * config.block_size, self.dtype, self.device
        )
        prefix_caching = config.enable_prefix_caching and not config.deterministic
        self.blocks = BlockManager(num_blocks, config.block_size, prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, config.max_num_seqs, config.prefill_chunk_tokens, aligned_chunks=config.deterministic
        )
        self.speculator = None
        if config.speculative_method is not None:
            self.speculator = Speculator(config, self.max_model_len, self.blocks, self.tokenizer, self.device)
        elif config.speculative_model is not None:
            raise ValueError("--speculative-model goes with --speculative-method draft, and only with it")
        self.runner = ModelRunner(
            self.model,
            cache,
            block_size=config.block_size,
            sink_slot=(num_blocks + 1) * config.block_size,
            # Verification rows go through the decode buckets too: they must reach what it needs.
            max_num_seqs=max(config.max_num_seqs, self.speculator.max_rows if self.speculator else 0),
            max_model_len=self.max_model_len,
            device=self.device,
            deterministic=config.deterministic,
            enforce_eager=config.enforce_eager,
        )
        # As served: the runner may have repacked them for its kernels (a tied LM head gets its own copy).
        self.weights = f"{config.quantization or str(self.dtype).removeprefix('torch.')} weights, " + (
            f"{self.model.weight_bytes() / 1e6:.1f} MB"
        )
        # Model vocabularies are often padded past the tokenizer's; those ids decode to nothing.
        padding = [b""] * (self.model_config.vocab_size - self.tokenizer.vocab_size)
        self.token_bytes = self.tokenizer.token_bytes + padding
        self.token_bytes_with_special = [
            b or self.tokenizer.decode([i], skip_special_tokens=False).encode()
            for i, b in enumerate(self.tokenizer.token_bytes)
        ] + padding
        self.grammars = GrammarCompiler(self.tokenizer.to_json(), self.model_config.vocab_size, self.eos_ids)

        def progress(message: str) -> None:
            log.info("start-up: %s", message)

        self.runner.warm_up(progress)
        if self.speculator is not None:
            self.speculator.warm_up(progress)
        self.requests: dict[int, Request] = {}
        self.steps = 0
        self.last_step: StepStats | None = None
        """The most recent step's shape and duration (None until a step ran)."""

    # -- requests in ---------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Check what depends on the model; return the effective max_tokens. Raises ParamError."""
        if not prompt_ids:
            raise ParamError("prompt", "the prompt must not be empty")
        vocab = self.tokenizer.vocab_size
        # Lengths first: free to check, they bound the scan below (this runs on the event loop).
        max_tokens = params.check_against_model(len(prompt_ids), vocab, self.max_model_len)
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ParamError("prompt", f"prompt token id {bad} is outside the vocabulary (size {vocab})")
        return min(max_tokens, self.max_new_tokens or max_tokens)

    def add(self, request: Request) -> None:
        self.requests[id(request)] = request  # first: if anything below fails, fail_all still reaches it
        params = request.params
        if params.prompt_logprobs is not None:  # the first prompt token is reported, with no logprob
            request.prompt_logprobs.append(self._logprob(request.prompt_ids[0], (None, [])))
        bytes_table = self.token_bytes if params.skip_special_tokens else self.token_bytes_with_special
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.device).manual_seed((params.seed + index) % 2**64)
            seq = Sequence(
                request=request,
                index=index,
                token_ids=list(request.prompt_ids),
                detokenizer=IncrementalDetokenizer(bytes_table, params.stop),
                generator=generator,
                matcher=request.grammar.matcher() if request.grammar is not None else None,
            )
            request.sequences.append(seq)
            # Choices after the first wait for it to prefill the prompt they share.
            if index == 0 or self.config.deterministic:
                self.scheduler.add(seq)
            else:
                request.held_back.append(seq)

    def abort(self, request: Request) -> None:
        for seq in request.held_back:  # choices not admitted yet: in no queue, holding no blocks
            seq.status = Status.FINISHED
        request.held_back.clear()
        for seq in request.sequences:
            seq.matcher = None
            if not seq.is_finished:
                self._remove(seq)
        request.done = True
        self.requests.pop(id(request), None)

    # -- the step ------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Output]:
        step = self.scheduler.schedule()
        if not step:
            return []
        now = time.monotonic()
        for seq, n in zip(step.sequences, step.num_tokens, strict=True):
            timings = seq.request.timings
            if timings.scheduled is None:
                timings.scheduled = now
                seq.request.cached_tokens = seq.num_computed_tokens - n
        started = time.perf_counter()
        decode_rows = sum(1 for n in step.num_tokens if n == 1)
        self.last_step = StepStats(
            decode_rows=decode_rows,
            prefill_tokens=sum(step.num_tokens) - decode_rows,
            preempted=len(step.preempted),
            seconds=0.0,
        )
        proposals = self.speculator.propose(step) if self.speculator is not None else None
        draft_of = {id(s): p for s, p in zip(step.sequences, proposals, strict=True)} if proposals else {}
        # Grammar masks of the rows that sample this step (and after each of their proposed tokens),
        # computed while the forward runs.
        sampling = [s for s in step.sequences if s.matcher is not None and s.num_missing_tokens == 0]
        masks = None
        if sampling:
            drafted = [draft_of.get(id(s), []) for s in sampling]
            masks = self.grammars.start_masks([s.matcher for s in sampling], drafted)
        try:
            ready, logits, picks, prompt = self.runner.execute(step, proposals)
        finally:
            if masks is not None:
                masks.result()  # never leave a mask computation running past a failed step
        self.steps += 1
        outputs: list[Output] = []
        for scored in prompt:
            outputs.extend(self._score_prompt(scored))
        for seq in step.sequences:
            self.blocks.register_computed(seq)
            self._release_held_back(seq)
        if logits is None:
            self._time_step(started)
            return outputs
        # Logits rows per ready sequence: one, or with proposals one more per proposed token.
        drafts = [draft_of.get(id(s), []) for s in ready]
        first_row = [0]
        for proposal in drafts:
            first_row.append(first_row[-1] + 1 + len(proposal))
        rows = [r for s, p in zip(ready, drafts, strict=True) for r in self._sample_rows(s, p)]
        constrained = [i for i, s in enumerate(ready) if s.matcher is not None]
        masked = [first_row[i] + j for i in constrained for j in range(1 + len(drafts[i]))]
        allowed = None
        if masks is not None:
            # Bitmask rows follow `sampling`: each sequence's own row, then one per proposed token.
            mask_row, at = {}, 0
            for s in sampling:
                mask_row[id(s)] = at
                at += 1 + len(draft_of.get(id(s), []))
            mask_rows = [mask_row[id(ready[i])] + j for i in constrained for j in range(1 + len(drafts[i]))]
            allowed = self.grammars.allowed_tokens(masks, mask_rows, logits.device)
        rewind = {i: ready[i].generator.get_state() for i, p in enumerate(drafts) if p and ready[i].generator}
        result = sample(logits, rows, masked, allowed, picks)
        now = time.monotonic()
        for i, seq in enumerate(ready):
            row = first_row[i]
            if seq.request.done:
                continue
            error = result.errors[row]
            if error is not None:
                outputs.extend(self._fail_suspect(seq.request, error))
            elif seq.request.max_tokens == 0:  # the prompt was all it asked for
                outputs.extend(self._append(seq, None, None, now))
            elif drafts[i]:
                outputs.extend(self._verify(seq, drafts[i], result, row, rewind.get(i), now))
            else:
                outputs.extend(self._append(seq, result.token_ids[row], result.logprobs[row], now))
        self._time_step(started)
        return outputs

    def _score_prompt(self, scored: PromptLogits) -> list[Output]:
        """Record the log-probabilities of the prompt tokens these logits score (once each)."""
        seq, request = scored.seq, scored.seq.request
        if request.done:
            return []
        skip = len(request.prompt_logprobs) - (scored.first + 1)  # scored already, by another choice
        logits = scored.logits[max(skip, 0) :]
        first = scored.first + max(skip, 0)
        targets = seq.token_ids[first + 1 : first + 1 + len(logits)]
        result = score(logits, targets, request.params.prompt_logprobs or 0)
        if result is None:
            return self._fail_suspect(request, NON_FINITE_LOGITS)
        for target, lp, rank, top in zip(targets, *result, strict=True):
            request.prompt_logprobs.append(self._logprob(target, (lp, top), rank))
        return []

    def _time_step(self, started: float) -> None:
        assert self.last_step is not None
        self.last_step = replace(self.last_step, seconds=time.perf_counter() - started)

    def _release_held_back(self, seq: Sequence) -> None:
        request = seq.request
        if seq.index != 0 or not request.held_back or seq.num_computed_tokens < seq.num_prompt_tokens:
            return
        for child in request.held_back:
            self.blocks.share_prefix(seq, child)
            self.scheduler.add(child, front=True)
        request.held_back.clear()

    def _sample_rows(self, seq: Sequence, proposal: list[int]) -> list[SampleRow]:
        """The sampler's view of `seq`'s next token, and of the one after each proposed token (as if
        the proposals before it had been emitted: penalties and min_tokens see them)."""
        params = seq.params
        penalties = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        prompt = seq.token_ids[: seq.num_prompt_tokens] if penalties else []
        output = seq.output_ids if penalties else []
        rows = []
        for j in range(len(proposal) + 1):
            banned: tuple[int, ...] = ()
            if seq.num_output_tokens + j < params.min_tokens:
                banned = tuple(params.stop_token_ids) + (() if params.ignore_eos else tuple(self.eos_ids))
            output_ids = output + proposal[:j] if penalties else []
            rows.append(SampleRow(params, prompt, output_ids, seq.generator, banned))
        return rows

    def _verify(
        self,
        seq: Sequence,
        proposal: list[int],
        result: SampleResult,
        first: int,
        generator_state: torch.Tensor | None,
        now: float,
    ) -> list[Output]:
        """Emit the model's tokens at `seq`'s verify rows, one by one, up to the first that differs
        from its proposal (or ends the sequence), and keep the cache of the proposals accepted.

        Row j's token is what decoding alone would draw after the proposals before it, from the same
        random numbers: a proposal is accepted exactly when the model draws it (probability p(x): the
        rejection-sampling rule for a one-token proposal), and a rejection yields the model's own
        token, drawn from p without x. Greedy rows are token-for-token those of plain decoding, and so
        are seeded ones: their generator is rewound to where the emitted tokens' draws end.
        """
        request = seq.request
        outputs: list[Output] = []
        accepted = emitted = 0
        request.draft_tokens += len(proposal)
        for j in range(len(proposal) + 1):
            error = result.errors[first + j]
            if error is not None:  # where decoding alone would have failed too (j = 0: checked already)
                return outputs + self._fail_suspect(request, error)
            token = result.token_ids[first + j]
            hit = j < len(proposal) and token == proposal[j]
            accepted += hit
            request.accepted_tokens += hit  # before _append: it may finish the request
            outputs.extend(self._append(seq, token, result.logprobs[first + j], now))
            emitted += 1
            if seq.is_finished or request.done or not hit:
                break
        assert self.speculator is not None
        self.speculator.record(seq, len(proposal), accepted, emitted)
        if generator_state is not None and emitted < len(proposal) + 1:
            assert seq.generator is not None
            seq.generator.set_state(generator_state)
            skip_draws(seq.generator, emitted)
        if not seq.is_finished:
            seq.num_computed_tokens += accepted
            self.blocks.trim(seq, seq.num_tokens)
            self.blocks.register_computed(seq)
        return outputs

    def _logprob(
        self, token_id: int, lp: tuple[float | None, list[tuple[int, float]]], rank: int | None = None
    ) -> TokenLogprob:
        def piece(t: int) -> tuple[str, list[int]]:
            raw = self.token_bytes_with_special[t]
            return raw.decode("utf-8", errors="replace"), list(raw)

        text, raw = piece(token_id)
        top = [TopLogprob(t, *piece(t)[:1], logprob=v, bytes=piece(t)[1]) for t, v in lp[1]]
        return TokenLogprob(token_id=token_id, token=text, logprob=lp[0], bytes=raw, top=top, rank=rank)

    def _append(
        self, seq: Sequence, token: int | None, lp: tuple[float, list[tuple[int, float]]] | None, now: float
    ) -> list[Output]:
        """Add a sampled token to `seq` (None: a prompt-only request, which ends here); what it reports."""
        request, params = seq.request, seq.params
        if token is None:
            seq.finish_reason = "length"
        else:
            seq.token_ids.append(token)
            timings = request.timings
            if timings.first_token is None:
                timings.first_token = now
            if not timings.token_times or timings.token_times[-1] != now:
                timings.token_times.append(now)
            if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
                seq.finish_reason, seq.stop_reason = "stop", token
            else:
                if seq.matcher is not None and not seq.matcher.consume_token(token):
                    return self._fail(request, f"the output left its grammar: {describe_error(seq.matcher)}")
                stop = seq.detokenizer.add(token)
                if stop is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
                elif seq.matcher is not None and seq.matcher.is_stopped():
                    seq.finish_reason = "stop"  # the grammar is complete: nothing but EOS could follow
                elif seq.num_output_tokens >= request.max_tokens or seq.num_tokens >= self.max_model_len:
                    seq.finish_reason = "length"
        finished = seq.finish_reason is not None
        if finished:
            seq.matcher = None
            seq.detokenizer.finish()
        first = seq.num_output_tokens <= 1
        delta = Delta(
            index=seq.index,
            text=seq.detokenizer.delta(final=finished),
            token_ids=[] if token is None else [token],
            logprobs=[self._logprob(token, lp)] if lp is not None and token is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            prompt_logprobs=request.prompt_logprobs if first and params.prompt_logprobs is not None else None,
        )
        outputs: list[Output] = [(request, delta)]
        if finished:
            self._remove(seq)
            if all(s.is_finished for s in request.sequences):
                outputs.append((request, self._finish(request, now)))
        return outputs

    def _remove(self, seq: Sequence) -> None:
        """`seq` is done: out of the queues, its blocks (and its draft's) freed."""
        self.scheduler.remove(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

    def _finish(self, request: Request, now: float) -> Finished:
        request.done = True
        request.timings.finished = now
        self.requests.pop(id(request), None)
        return Finished(
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=request.completion_tokens,
            cached_tokens=request.cached_tokens,
            timings=request.timings,
            draft_tokens=request.draft_tokens,
            accepted_tokens=request.accepted_tokens,
        )

    def _fail_suspect(self, request: Request, message: str) -> list[Output]:
        """Fail a request whose numbers went wrong; its cache content must serve no later prompt."""
        for seq in request.sequences:
            self.blocks.forget(seq)
        return self._fail(request, message)

    def _fail(self, request: Request, message: str) -> list[Output]:
        self.abort(request)
        request.timings.finished = time.monotonic()
        return [(request, EngineError(message))]

    def fail_all(self, message: str) -> list[Output]:
        outputs: list[Output] = []
        for request in list(self.requests.values()):
            outputs.extend(self._fail(request, message))
        return outputs

    def stats(self) -> EngineStats:
        bs = self.blocks.block_size
        spec = {}
        if self.speculator is not None:
            c = self.speculator.counters
            spec = dict(
                spec_drafts=c.drafts,
                spec_draft_tokens=c.draft_tokens,
                spec_accepted_tokens=c.accepted_tokens,
                spec_emitted_tokens=c.emitted_tokens,
            )
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + sum(len(r.held_back) for r in self.requests.values()),
            kv_total_tokens=self.kv_capacity_tokens,
            kv_used_tokens=self.blocks.num_used_blocks * bs,
            prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens,
            steps=self.steps,
            **spec,
        )
