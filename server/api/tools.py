"""OpenAI tools: which tools a request offers, the grammar of a forced call, and the reply's calls.

The format (Hermes and Qwen's, which the shipped chat template teaches): the template lists the tools in
the system turn, and the model answers with optional text then one or more

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

blocks. `tool_choice`:
- "none": the tools are not rendered and the reply is plain text;
- "auto" (the default when tools are given): the reply is parsed, so a model that never learned the
  format simply answers in text;
- "required" / a named function: generation runs under a grammar of that format whose arguments follow
  the tool's JSON Schema, so the call is always well-formed (one call for a named function or with
  `parallel_tool_calls: false`, one or more otherwise).
Parsed calls become `message.tool_calls` (finish_reason "tool_calls"); a block that is not valid JSON
with a "name" stays in the content as text.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from server.api.schemas import ChatCompletionRequest, Tool
from server.api.structured import Structured
from server.engine.params import ParamError
from server.engine.structured import Constraint, check_json_schema

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for function names."""
CALL_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""A forced call's arguments are written as the chat template writes calls (json.dumps' separators)."""


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and how the reply may use them."""

    tools: list[Tool]
    choice: str
    """"auto", "required" or "named"."""
    named: str | None = None
    parallel: bool = True

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template receives them (OpenAI's tool objects)."""
        functions = [t.function.model_dump(exclude_none=True) for t in self.tools]
        return [{"type": "function", "function": f} for f in functions]

    def structured(self) -> Structured | None:
        """The grammar of a forced call (None for "auto": the reply is free and parsed afterwards)."""
        if self.choice == "auto":
            return None
        tools = [t for t in self.tools if self.named is None or t.function.name == self.named]
        rules = [_call_rule(i, t) for i, t in enumerate(tools)]
        repeat = ' ("\\n" call)*' if self.parallel and self.named is None else ""
        alternatives = " | ".join(f"fn_{i}" for i in range(len(tools)))
        lark = "\n".join([f"start: call{repeat}", f'call: "{OPEN}\\n" ({alternatives}) "\\n{CLOSE}"', *rules])
        return Structured(Constraint("grammar", lark, "tools"), "tool_call")


def _call_rule(index: int, tool: Tool) -> str:
    """`fn_i: {"name": "f", "arguments": <the tool's schema>}` in llguidance's Lark."""
    schema = dict(tool.function.parameters or {"type": "object"})
    schema["x-guidance"] = CALL_JSON_OPTIONS
    head = json.dumps('{"name": ' + json.dumps(tool.function.name) + ', "arguments": ')
    return f'fn_{index}: {head} %json {json.dumps(schema)} "}}"'


def tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """What the request's tools and tool_choice ask for (None: no tools in play); shape errors as 400s."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise ParamError("tool_choice", "tool_choice needs tools")
        return None
    names = [t.function.name for t in body.tools]
    for name in names:
        if not NAME.match(name):
            raise ParamError("tools", f"tool name {name!r} must be 1-64 letters, digits, '_' or '-'")
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ParamError("tools", f"tool name {duplicate!r} is given twice")
    if choice == "none":
        return None
    parallel = body.parallel_tool_calls is not False
    if choice is None or isinstance(choice, str):
        return ToolUse(body.tools, choice or "auto", parallel=parallel)
    if choice.function.name not in names:
        raise ParamError("tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools")
    return ToolUse(body.tools, "named", named=choice.function.name, parallel=False)


async def check_parameters(use: ToolUse) -> None:
    """Each tool's `parameters` must be a valid JSON Schema (checked in a worker thread: it may be big)."""

    def check() -> None:
        for tool in use.tools:
            if tool.function.parameters is not None:
                check_json_schema(tool.function.parameters, "tools")

    await asyncio.to_thread(check)


# ---- the reply ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def as_message(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


def _parse_block(body: str) -> ParsedCall | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ParsedCall(call["name"], arguments)


class ToolCallParser:
    """Splits one choice's reply into content and tool calls as it streams in.

    Text that could be the start of `<tool_call>` is held back until it is known; whitespace around
    calls is dropped. Feeding the reply whole or token by token gives the same pieces.
    """

    def __init__(self) -> None:
        self.calls: list[ParsedCall] = []
        self._buffer = ""
        self._inside = False
        self._held = ""
        """Trailing whitespace of the content so far: dropped if a call follows."""
        self._after_call = False
        self._before_block = ""
        """The whitespace just before the open block: restored if the block is not a call after all."""

    def feed(self, text: str) -> list[str | ParsedCall]:
        """Content pieces and calls completed by `text`, in order."""
        self._buffer += text
        out: list[str | ParsedCall] = []
        while True:
            if self._inside:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return out
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE) :]
                self._inside = False
                call = _parse_block(body)
                if call is None:  # not a call after all: the block stays in the content, as text
                    self._content(self._before_block + OPEN + body + CLOSE, out)
                else:
                    self._held, self._after_call = "", True
                    self.calls.append(call)
                    out.append(call)
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                self._content(self._buffer[:start], out, before_call=True)
                self._buffer = self._buffer[start + len(OPEN) :]
                self._inside = True
                continue
            cut = len(self._buffer) - _partial_open(self._buffer)
            self._content(self._buffer[:cut], out)
            self._buffer = self._buffer[cut:]
            return out

    def finish(self) -> list[str | ParsedCall]:
        """What is left at the end of the reply: an unfinished block or held text, as content."""
        rest = (self._before_block + OPEN if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        out: list[str | ParsedCall] = []
        self._content(rest, out)
        if self._held and not self.calls:
            out.append(self._held)  # a plain reply keeps its every character
        self._held = ""
        return out

    def _content(self, text: str, out: list[str | ParsedCall], before_call: bool = False) -> None:
        text = self._held + text
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        kept = text.rstrip()
        self._held, self._before_block = ("", text[len(kept) :]) if before_call else (text[len(kept) :], "")
        if kept:
            out.append(kept)


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>`."""
    return next((k for k in range(min(len(text), len(OPEN) - 1), 0, -1) if OPEN.startswith(text[-k:])), 0)


def parse_reply(text: str) -> tuple[str | None, list[ParsedCall]]:
    """A whole reply's content (None when it held only calls) and calls."""
    parser = ToolCallParser()
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    return (content or None) if parser.calls else content, parser.calls


def finish_reason(reason: str | None, calls: list[ParsedCall]) -> str | None:
    """OpenAI's "tool_calls" when the reply holds complete calls (as vLLM, even if cut short after them)."""
    return "tool_calls" if calls and reason in ("stop", "length") else reason


def stream_delta(pieces: list[str | ParsedCall], first_index: int) -> dict[str, Any]:
    """One chunk's delta: the content pieces joined, and each call whole (id, name and arguments)."""
    delta: dict[str, Any] = {}
    content = "".join(p for p in pieces if isinstance(p, str))
    if content:
        delta["content"] = content
    calls = [p for p in pieces if isinstance(p, ParsedCall)]
    if calls:
        delta["tool_calls"] = [
            {"index": first_index + k, **call.as_message()} for k, call in enumerate(calls)
        ]
    return delta


class StreamedReply:
    """One choice's stream in tool mode: each engine delta → (the chunk's delta, its finish_reason)."""

    def __init__(self) -> None:
        self._parser = ToolCallParser()

    def delta(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        emitted = len(self._parser.calls)
        pieces = self._parser.feed(text)
        if reason is not None:
            pieces += self._parser.finish()
        return stream_delta(pieces, emitted), finish_reason(reason, self._parser.calls)


def reply_message(text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
    """A whole choice in tool mode: (the assistant message, its finish_reason)."""
    content, calls = parse_reply(text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.as_message() for c in calls]
    return message, finish_reason(reason, calls)
