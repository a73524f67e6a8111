"""OpenAI request models (pydantic: types and shape only) and the response bodies we send.

Limits live in `SamplingParams`; these models only check that each field has the right type, so a
bad value is reported once, by the engine's own validation. Fields we accept but do not implement
are declared so that a request using them gets a 400 naming them instead of being silently ignored.
Responses are plain dicts: they are built per token on the streaming path, where pydantic would cost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.engine.outputs import TokenLogprob
from server.engine.params import ParamError, SamplingParams

MAX_PROMPTS = 64
"""Most prompts in one completions call (each is queued as its own engine request)."""

Prompt = str | list[int] | list[str | list[int]]


def check_unicode(param: str, text: str) -> str:
    """`text` if it can be encoded as UTF-8; a lone surrogate (JSON allows "\\ud800") is a ParamError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParamError(
            param, f"{param} is not valid Unicode: lone surrogate at character {exc.start}"
        ) from None
    return text


@dataclass(frozen=True)
class Tokenization:
    """How a request's text becomes token ids: one policy for completions, chat and /tokenize.

    `parse_special`: whether special-token text (`<|im_end|>`) becomes special tokens. A completions
    prompt is raw model input (yes, as vLLM and llama.cpp); chat content is text (no: only the chat
    template makes special tokens, so a message cannot forge a turn). `add_special_tokens`: whether
    the tokenizer's post-processor adds its tokens (a BOS) around the text, as vLLM's flag of that
    name (completions: yes; chat: no, the template has them).
    """

    parse_special: bool
    add_special_tokens: bool
    add_generation_prompt: bool = True

    @classmethod
    def for_prompt(cls, parse_special: bool | None, add_special_tokens: bool | None) -> Tokenization:
        return cls(parse_special is not False, add_special_tokens is not False)

    @classmethod
    def for_chat(
        cls,
        parse_special: bool | None,
        add_special_tokens: bool | None,
        add_generation_prompt: bool | None = None,
    ) -> Tokenization:
        return cls(bool(parse_special), bool(add_special_tokens), add_generation_prompt is not False)


class _Strict(BaseModel):
    # strict: "2" is not an int and "true" is not a bool; extra="forbid": typos are errors, not no-ops.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    """Accepted for OpenAI's SDK; the schema is always enforced, strict or not."""


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _Generation(_Strict):
    """Fields both endpoints share. None means "not given": SamplingParams' default applies."""

    model: str
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    # Structured output: OpenAI's response_format, and vLLM's guided_* extensions (server/api/structured.py)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    add_special_tokens: bool | None = None
    # ours (llama.cpp's name): whether special-token text in the prompt or messages is parsed
    parse_special: bool | None = None

    _PASSED: ClassVar[tuple[str, ...]] = (
        "n", "temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "seed",
        "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "min_tokens",
        "skip_special_tokens",
    )  # fmt: skip

    def _sampling_kwargs(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The request's sampling fields over `defaults` (the model's recommendation) for those it omits."""
        given = {name: value for name in self._PASSED if (value := getattr(self, name)) is not None}
        return {**defaults, **given}

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed when stream is true")
        for stop in [self.stop] if isinstance(self.stop, str) else self.stop or []:
            check_unicode("stop", stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    prompt: Prompt
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = None  # vLLM's: the top alternatives at each prompt position

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list, each a string or token ids; shape errors as ParamError."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            prompts: list[Any] = [self.prompt]
        else:
            prompts = list(self.prompt)
        if not prompts:
            raise ParamError("prompt", "prompt must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise ParamError("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        for p in prompts:
            if len(p) == 0:
                raise ParamError("prompt", "prompt must not be empty")
            if isinstance(p, str):
                check_unicode("prompt", p)
        return prompts

    def tokenization(self) -> Tokenization:
        return Tokenization.for_prompt(self.parse_special, self.add_special_tokens)

    def sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        """Validate everything not tied to the model; raise ParamError naming the field."""
        self._check_common()
        if self.suffix:
            raise ParamError("suffix", "suffix is not supported")
        kwargs = self._sampling_kwargs(defaults)
        if self.best_of is not None and self.best_of != kwargs.get("n", 1):
            raise ParamError("best_of", "best_of is not supported (only best_of equal to n)")
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.logprobs is not None:
            kwargs["logprobs"] = self.logprobs
        scored = self.prompt_logprobs
        if self.echo and (self.logprobs is not None or self.max_tokens == 0):
            # Echoed logprobs score the prompt (in its own prefill); max_tokens 0 scores nothing else.
            scored = max(scored or 0, self.logprobs or 0)
        if scored is not None:
            kwargs["prompt_logprobs"] = scored
        return SamplingParams(**kwargs)


class ToolCallFunction(_Strict):
    name: str
    arguments: str
    """JSON text, as OpenAI returns it."""


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls, sent back in the history."""
    tool_call_id: str | None = None
    """A tool turn's answer to that call."""
    refusal: str | None = None
    """Sent back by clients that echo an assistant message; not rendered."""

    def text(self, index: int) -> str:
        """The content as one string; list content may hold only text parts (joined by newlines)."""
        if isinstance(self.content, str):
            return check_unicode("messages", self.content)
        if self.content is None:
            raise ParamError("messages", f"messages[{index}].content is required")
        texts = []
        for j, part in enumerate(self.content):
            where = f"messages[{index}].content[{j}]"
            if part.get("type") != "text":
                raise ParamError(
                    "messages",
                    f"{where}: content part type {part.get('type')!r} is not supported (only 'text')",
                )
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ParamError("messages", f'{where}: a text part is {{"type": "text", "text": string}}')
            texts.append(check_unicode("messages", part["text"]))
        return "\n".join(texts)

    def for_template(self, index: int) -> dict[str, Any]:
        """This message as the chat template takes it; role-specific fields checked."""
        where = f"messages[{index}]"
        if self.tool_calls is not None and self.role != "assistant":
            raise ParamError("messages", f"{where}: only assistant messages carry tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ParamError("messages", f"{where}: tool messages, and only they, need a tool_call_id")
        role = "system" if self.role == "developer" else self.role
        if self.role == "assistant" and self.tool_calls:
            content = "" if self.content is None else self.text(index)  # "": templates concatenate it
            calls = [call_for_template(where, j, c) for j, c in enumerate(self.tool_calls)]
            return {"role": role, "content": content, "tool_calls": calls}
        out: dict[str, Any] = {"role": role, "content": self.text(index)}
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out


def call_for_template(where: str, index: int, call: ToolCall) -> dict[str, Any]:
    """A tool call of the history with its arguments parsed, as templates (and vLLM) expect them."""
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        raise ParamError(
            "messages", f"{where}.tool_calls[{index}].function.arguments is not valid JSON"
        ) from None
    function = {"name": call.function.name, "arguments": arguments}
    return {"id": call.id, "type": "function", "function": function}


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON Schema for the arguments object (absent: any object)."""
    strict: bool | None = None
    """Accepted for OpenAI's SDK; a forced call always follows `parameters`."""


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them (transformers' convention for tool calls: arguments as
    an object); developer messages count as system ones."""
    return [m.for_template(i) for i, m in enumerate(messages)]


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Accepted and ignored: they change nothing in the output.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # Tools (server/api/tools.py)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Declared only to be refused by name.
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    def _unsupported(self) -> str | None:
        for name in (
            "functions",
            "function_call",
            "audio",
            "prediction",
            "reasoning_effort",
            "web_search_options",
        ):
            if getattr(self, name) is not None:
                return name
        if self.modalities is not None and self.modalities != ["text"]:
            return "modalities"
        return None

    def tokenization(self) -> Tokenization:
        return Tokenization.for_chat(self.parse_special, self.add_special_tokens)

    def chat_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise ParamError("messages", "messages must not be empty")
        return template_messages(self.messages)

    def sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        self._check_common()
        unsupported = self._unsupported()
        if unsupported:
            raise ParamError(unsupported, f"{unsupported} is not supported by this server")
        kwargs = self._sampling_kwargs(defaults)
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        kwargs["max_tokens"] = limit  # None: up to the context, as OpenAI's chat default
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.logprobs:
            kwargs["logprobs"] = self.top_logprobs or 0
        try:
            return SamplingParams(**kwargs)
        except ParamError as exc:
            raise self.renamed(exc) from None

    def renamed(self, exc: ParamError) -> ParamError:
        """The error under the name this request used (SamplingParams says max_tokens and logprobs)."""
        names = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        if exc.param not in names:
            return exc
        return ParamError(names[exc.param], str(exc).replace(exc.param, names[exc.param]))


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    parse_special: bool | None = None

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, prompt: str | None) -> str | None:
        return prompt if prompt is None else check_unicode("prompt", prompt)

    def tokenization(self) -> Tokenization:
        """A prompt is tokenized as completions would, messages as chat would (vLLM's defaults)."""
        if self.messages is not None:
            return Tokenization.for_chat(
                self.parse_special, self.add_special_tokens, self.add_generation_prompt
            )
        if self.add_generation_prompt is not None:
            raise ParamError("add_generation_prompt", "add_generation_prompt applies to messages only")
        return Tokenization.for_prompt(self.parse_special, self.add_special_tokens)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---- response bodies -------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class LegacyLogprobs:
    """Completions' logprobs (tokens, token_logprobs, top_logprobs, text_offset) for one choice.

    Offsets count characters from the start of the choice's text, across stream chunks.
    """

    def __init__(self) -> None:
        self.offset = 0

    def render(self, items: list[TokenLogprob]) -> dict[str, Any]:
        """Echoed prompt tokens come first; the first has no logprob and no alternatives (null)."""
        offsets = []
        for item in items:
            offsets.append(self.offset)
            self.offset += len(item.token)
        return {
            "tokens": [t.token for t in items],
            "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [
                None if t.logprob is None else {alt.token: alt.logprob for alt in t.top} for t in items
            ],
            "text_offset": offsets,
        }


def prompt_logprobs(items: list[TokenLogprob]) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, {token id: {logprob, rank, decoded_token}} for the
    token itself and the top alternatives; null for the first token."""
    out: list[dict[str, Any] | None] = []
    for t in items:
        if t.logprob is None:
            out.append(None)
            continue
        entry = {str(t.token_id): {"logprob": t.logprob, "rank": t.rank, "decoded_token": t.token}}
        for rank, alt in enumerate(t.top, 1):
            entry.setdefault(
                str(alt.token_id), {"logprob": alt.logprob, "rank": rank, "decoded_token": alt.token}
            )
        out.append(entry)
    return out


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": a.bytes} for a in t.top],
            }
            for t in items
        ],
        "refusal": None,
    }
