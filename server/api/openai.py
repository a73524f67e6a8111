"""The HTTP routes: OpenAI's /v1 API, vLLM's /tokenize and /detokenize, and health probes.

Each generation route only parses (pydantic, then SamplingParams), hands the request to
`GenerationRequest` (tokenize, submit, stream or collect, account), and says how its choices look:
one formatter per endpoint, for whole responses and stream chunks alike.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api import tools
from server.api.request import Choice, GenerationRequest, encode
from server.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LegacyLogprobs,
    TokenizeRequest,
    chat_logprobs,
    prompt_logprobs,
    template_messages,
)
from server.api.state import state_of
from server.api.structured import structured_output
from server.engine.outputs import Delta, TokenLogprob
from server.engine.params import ParamError

router = APIRouter()


def _token_ids(param: str, ids: list[int], vocab: int) -> list[int]:
    """`ids`, if all are in the vocabulary (the tokenizer cannot decode the others)."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ParamError(param, f"token id {bad} is outside the vocabulary (size {vocab})")
    return ids


def _nothing_new(delta: Delta) -> bool:
    return not delta.text and delta.finish_reason is None and not delta.logprobs


class CompletionFormat:
    """/v1/completions: text choices with OpenAI's legacy logprobs; `echo` puts each choice's prompt
    (and, with logprobs, its scored tokens) before its text; vLLM's `prompt_logprobs` on request."""

    object = chunk_object = "text_completion"

    def __init__(self, n: int, logprobs: bool, echo: list[str] | None, prompt_logprobs: bool) -> None:
        self.n = n
        self.logprobs = logprobs
        self.echo = echo
        """Each prompt's text, when echoed."""
        self.prompt_logprobs = prompt_logprobs
        self.trackers: dict[int, LegacyLogprobs] = {}
        """Per streamed choice: its logprobs' text offsets run on across chunks."""

    def prelude(self) -> list[dict[str, Any]]:
        return []

    def chunk_choice(self, index: int, delta: Delta) -> dict[str, Any] | None:
        first = index not in self.trackers
        tracker = self.trackers.setdefault(index, LegacyLogprobs())
        if _nothing_new(delta) and not (first and (self.echo is not None or delta.prompt_logprobs)):
            return None
        choice = self._render(index, delta.text, delta.logprobs or [], delta.prompt_logprobs, first, tracker)
        return {**choice, "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}

    def body_choice(self, index: int, choice: Choice) -> dict[str, Any]:
        rendered = self._render(
            index, choice.text, choice.logprobs, choice.prompt_logprobs, True, LegacyLogprobs()
        )
        return {**rendered, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}

    def _render(
        self,
        index: int,
        text: str,
        logprobs: list[TokenLogprob],
        scored: list[TokenLogprob] | None,
        first: bool,
        tracker: LegacyLogprobs,
    ) -> dict[str, Any]:
        """Text and logprobs of a choice's output; on its `first` output, the echoed prompt before them."""
        if first and self.echo is not None:
            text = self.echo[index // self.n] + text
            logprobs = (scored or []) + logprobs
        out = {"index": index, "text": text, "logprobs": tracker.render(logprobs) if self.logprobs else None}
        if self.prompt_logprobs and first:
            out["prompt_logprobs"] = prompt_logprobs(scored or [])
        return out


class ChatFormat:
    """/v1/chat/completions: assistant messages, role first when streamed; with tools, the reply's
    `<tool_call>` blocks become `tool_calls` (server/api/tools.py)."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, n: int, logprobs: bool, tool_calls: bool = False) -> None:
        self.n = n
        self.logprobs = logprobs
        self.tool_calls = tool_calls
        self.replies: dict[int, tools.StreamedReply] = {}
        """Per streamed choice in tool mode: its parser."""

    def prelude(self) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [{"index": j, "delta": role, "logprobs": None, "finish_reason": None} for j in range(self.n)]

    def chunk_choice(self, index: int, delta: Delta) -> dict[str, Any] | None:
        if self.tool_calls:
            reply = self.replies.setdefault(index, tools.StreamedReply())
            content, reason = reply.delta(delta.text, delta.finish_reason)
        else:
            content, reason = ({"content": delta.text} if delta.text else {}), delta.finish_reason
        if not content and reason is None and not delta.logprobs:
            return None
        return {"index": index, "delta": content,
                "logprobs": chat_logprobs(delta.logprobs or []) if self.logprobs else None,
                "finish_reason": reason, "stop_reason": delta.stop_reason}  # fmt: skip

    def body_choice(self, index: int, choice: Choice) -> dict[str, Any]:
        message, reason = {"role": "assistant", "content": choice.text}, choice.finish_reason
        if self.tool_calls:
            message, reason = tools.reply_message(choice.text, reason)
        return {"index": index, "message": message,
                "logprobs": chat_logprobs(choice.logprobs) if self.logprobs else None,
                "finish_reason": reason, "stop_reason": choice.stop_reason}  # fmt: skip


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = state_of(request)
    state.check_model(body.model)
    params = body.sampling_params(state.engine.sampling_defaults)
    prompts = body.prompts()
    structured = structured_output(body)
    echo = None
    if body.echo:
        vocab = state.engine.vocab_size
        echo = [
            p if isinstance(p, str) else await state.engine.decode(_token_ids("prompt", p, vocab))
            for p in prompts
        ]
    fmt = CompletionFormat(
        params.n, params.logprobs is not None, echo, prompt_logprobs=body.prompt_logprobs is not None
    )
    generation = await GenerationRequest.start(
        state, request, "cmpl", params, body.tokenization(), prompts=prompts, structured=structured
    )
    return generation.response(fmt, stream=body.stream, include_usage=body.include_usage)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = state_of(request)
    state.check_model(body.model)
    params = body.sampling_params(state.engine.sampling_defaults)
    messages = body.chat_messages()
    structured = structured_output(body)
    use = tools.tool_use(body)
    if use is not None:
        if structured is not None:
            param = structured.constraint.param
            raise ParamError(param, f"{param} cannot be combined with tools unless tool_choice is 'none'")
        await tools.check_parameters(use)
        structured = use.structured()
    fmt = ChatFormat(params.n, logprobs=params.logprobs is not None, tool_calls=use is not None)
    generation = await GenerationRequest.start(
        state, request, "chatcmpl", params, body.tokenization(), messages=messages, renamed=body.renamed,
        tools=use.template_tools() if use is not None else None, structured=structured,
    )  # fmt: skip
    return generation.response(fmt, stream=body.stream, include_usage=body.include_usage)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [state_of(request).model_card()]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    state = state_of(request)
    state.check_model(model)
    return state.model_card()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    state = state_of(request)
    if body.model is not None:
        state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ParamError("prompt", "give exactly one of prompt and messages")
    how = body.tokenization()
    if body.messages is not None:
        if not body.messages:
            raise ParamError("messages", "messages must not be empty")
        tokens = await encode(state.engine, how, template_messages(body.messages))
    else:
        tokens = await encode(state.engine, how, body.prompt)
    return {"count": len(tokens), "max_model_len": state.engine.max_model_len, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    state = state_of(request)
    if body.model is not None:
        state.check_model(body.model)
    return {"prompt": await state.engine.decode(_token_ids("tokens", body.tokens, state.engine.vocab_size))}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: the event loop answers and the engine thread is alive (readiness is /ready)."""
    if not state_of(request).engine.is_alive:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: weights loaded, engine thread stepping, and not shutting down."""
    state = state_of(request)
    status = state.readiness()
    return JSONResponse(
        {"status": status, "model": state.model_name}, status_code=200 if status == "ready" else 503
    )


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """The engine's live numbers (queue lengths, KV use), for tests, dashboards and load balancers."""
    state = state_of(request)
    s = state.engine.stats()
    return {
        "running": s.running,
        "waiting": s.waiting,
        "in_flight": state.engine.in_flight,
        "kv_total_tokens": s.kv_total_tokens,
        "kv_used_tokens": s.kv_used_tokens,
        "kv_usage": s.kv_usage,
        "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
        "steps": s.steps,
        "status": state.readiness(),
    }
