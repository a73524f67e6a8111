"""Byte-level BPE tokenizer: training, Hugging Face file I/O, exact token bytes, chat templates.

Wraps `tokenizers.Tokenizer` so that any HF checkpoint's tokenizer.json loads (ours, or a
sentencepiece-style one with Metaspace and byte fallback), and adds what serving needs: the exact
bytes each id contributes to the text (for incremental detokenizing) and the ids that end a turn.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (
    TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE, "chat_template.json",
    "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
)  # fmt: skip
"""Every file transformers may write for a tokenizer: what a checkpoint's copy of it consists of."""
ADDED_TOKEN_KEYS = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")

CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments '"
    " + 'within <tool_call></tool_call> XML tags:\n<tool_call>\n'"
    ' + \'{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n\' }}'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] in ['system', 'user'] or (message['role'] == 'assistant'"
    " and not message['tool_calls']) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant' }}"
    "{% if message['content'] %}{{ '\n' + message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{{ '\n<tool_call>\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson) + '\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% else %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, with tools, tool calls and tool results as Hermes and Qwen templates render them:
`tools` (transformers' convention: OpenAI's tool objects) in the system turn, each call of an
assistant turn as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, and tool results in
a user turn as `<tool_response>...</tool_response>`."""


_BLANK = "\ue000"
"""A private-use character: no tokenizer's special token is made of it."""


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names the file and the problem."""


@cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode map, which byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _mentions(component: Any, kind: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence of them) contains type `kind`."""
    if isinstance(component, dict):
        return component.get("type") == kind or any(_mentions(v, kind) for v in component.values())
    if isinstance(component, list):
        return any(_mentions(v, kind) for v in component)
    return False


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A loaded tokenizer plus the metadata from tokenizer_config.json that serving needs."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        bos_token: str | None = ENDOFTEXT,
        eos_token: str | None = ENDOFTEXT,
        chat_template: str | None = CHATML_TEMPLATE,
        model_max_length: int = 1024,
    ) -> None:
        self._tok = tokenizer
        # A twin that reads special-token text as plain text: user input must not inject control ids.
        self._plain = HFTokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.token_bytes = self._token_bytes()
        spec = json.loads(tokenizer.to_str())
        self.special_tokens = tuple(t["content"] for t in spec.get("added_tokens", []) if t.get("special"))
        """The text of every special token (what untrusted text must not turn into)."""
        self._special_ids = {self._tok.token_to_id(t) for t in self.special_tokens}
        self._added_prefix, self._added_suffix = self._post_processor_ids()

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_token_ids(self) -> list[int]:
        """The ids that end an assistant turn: EOS, and <|im_end|> where the vocabulary has it."""
        ids = [self.eos_token_id, self._tok.token_to_id(IM_END)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what other tokenizer-aware libraries load)."""
        return self._tok.to_str()

    @property
    def declares_chat(self) -> bool:
        """Whether the checkpoint declares a chat model: its tokenizer has a chat template, and not the
        ChatML placeholder `train_tokenizer` gives every tokenizer it makes from scratch (a model that
        `model.train` pretrained on raw text, never on a conversation)."""
        return bool(self.chat_template) and self.chat_template != CHATML_TEMPLATE

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, parse_special: bool = False, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings count as text unless `parse_special`.
        `add_special_tokens` adds what the tokenizer's post-processor puts around a text (a BOS, ...).

        Through `encode_batch`, which releases the GIL while it works (`encode` holds it: a megabyte
        prompt tokenized in a worker thread would stall the server's event loop for a second).
        """
        tok = self._tok if parse_special else self._plain
        ids = tok.encode_batch([text], add_special_tokens=False)[0].ids
        return self._with_added(ids) if add_special_tokens else ids

    def _with_added(self, ids: list[int]) -> list[int]:
        return [*self._added_prefix, *ids, *self._added_suffix]

    def _post_processor_ids(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a single text (none for ours; BOS for Llama)."""
        bare = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for i in range(len(full) - len(bare) + 1):
            if full[i : i + len(bare)] == bare:
                return full[:i], full[i + len(bare) :]
        return [], []

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        parse_special: bool = False,
        add_special_tokens: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The chat template's rendering of `messages` (and `tools`), as token ids.

        Only the template makes special tokens: special-token text anywhere in what the client sent
        (a message's content, a tool call's name or arguments, a tool's description or schema) stays
        text (unless `parse_special`), so a user cannot forge a turn. The template is rendered a second
        time with that text blanked out (same length), which shows where the template's own special
        tokens are; the rest is tokenized as text. Input without special-token text takes the plain
        path (one tokenization of the whole rendering), so ordinary chats are tokenized as before.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        if parse_special or not self._has_special([messages, tools]):
            return self.encode(text, parse_special=True, add_special_tokens=add_special_tokens)
        skeleton = self.apply_chat_template(
            self._blank_special(messages), add_generation_prompt, self._blank_special(tools)
        )
        if len(skeleton) != len(text):
            raise TokenizerError("the chat template changes message content in a way we cannot follow")
        encoding = self._tok.encode_batch([skeleton], add_special_tokens=False)[0]
        ids: list[int] = []
        end = 0
        for token_id, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id not in self._special_ids:
                continue
            ids += self.encode(text[end:start]) if start > end else []
            ids.append(token_id)
            end = stop
        ids += self.encode(text[end:]) if end < len(text) else []
        return self._with_added(ids) if add_special_tokens else ids

    def _has_special(self, value: Any) -> bool:
        """Whether any string in `value` (nested lists and dicts, keys included) holds special-token text."""
        if isinstance(value, str):
            return any(t in value for t in self.special_tokens)
        if isinstance(value, dict):
            return any(self._has_special(k) or self._has_special(v) for k, v in value.items())
        return isinstance(value, list | tuple) and any(self._has_special(v) for v in value)

    def _blank_special(self, value: Any) -> Any:
        """`value` with each special token's text, in every string, replaced by as many private-use
        characters: the same lengths, so the template renders the same layout."""
        if isinstance(value, str):
            for token in self.special_tokens:
                value = value.replace(token, _BLANK * len(token))
            return value
        if isinstance(value, dict):
            return {self._blank_special(k): self._blank_special(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._blank_special(v) for v in value]
        return value

    def encode_batch(self, texts: list[str], parse_special: bool = False) -> list[list[int]]:
        tok = self._tok if parse_special else self._plain
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; through `decode_batch`, which releases the GIL (as `encode` above)."""
        return self._tok.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]

    def _token_bytes(self) -> list[bytes]:
        spec = json.loads(self._tok.to_str())
        byte_level = _mentions(spec.get("decoder"), "ByteLevel") or _mentions(
            spec.get("pre_tokenizer"), "ByteLevel"
        )
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        added = {t["id"] for t in spec.get("added_tokens", [])}
        to_byte = _unicode_to_byte()
        out: list[bytes] = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or i in special:
                out.append(b"")
            elif i in added:
                out.append(piece.encode())
            elif byte_level:
                out.append(bytes(to_byte[c] for c in piece))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("▁", " ").encode())
        return out

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render the checkpoint's Jinja chat template in a sandbox, as transformers does (`tools`
        included: a template that ignores them renders none)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template")
        try:
            template = _jinja_env().from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            # A template's own errors on messages it did not expect (None content, a missing key).
            raise TokenizerError(f"chat template failed: {exc}") from None

    def to_str(self) -> str:
        """The tokenizer.json text: with `from_str`, how a trained tokenizer travels between processes."""
        return self._tok.to_str()

    @classmethod
    def from_str(cls, text: str, model_max_length: int) -> Tokenizer:
        """A tokenizer made by `train_tokenizer`, rebuilt from its `to_str()`."""
        return cls(HFTokenizer.from_str(text), model_max_length=model_max_length)

    def save(self, directory: Path | str) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for AutoTokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / TOKENIZER_FILE))
        spec = json.loads(self._tok.to_str())
        added = {
            str(t["id"]): {
                k: t[k] for k in ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
            }
            for t in spec.get("added_tokens", [])
        }
        extra = [t["content"] for t in spec.get("added_tokens", []) if t["special"]]
        extra = [t for t in extra if t not in (self.bos_token, self.eos_token)]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "additional_special_tokens": extra,
            "added_tokens_decoder": added,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
        }
        (directory / TOKENIZER_CONFIG_FILE).write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        special_map = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "additional_special_tokens": extra,
        }
        (directory / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path | str) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json from any Hugging Face checkpoint directory."""
        directory = Path(directory)
        tok_path, config_path = directory / TOKENIZER_FILE, directory / TOKENIZER_CONFIG_FILE
        for path in (tok_path, config_path):
            if not path.is_file():
                raise TokenizerError(f"{path}: file not found")
        try:
            tokenizer = HFTokenizer.from_file(str(tok_path))
        except Exception as exc:  # the Rust side raises bare Exception on any parse failure
            raise TokenizerError(
                f"{tok_path}: not a valid tokenizer file ({str(exc).splitlines()[0]})"
            ) from None
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{config_path}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (directory / CHAT_TEMPLATE_FILE).is_file():
            template = (directory / CHAT_TEMPLATE_FILE).read_text()
        max_length = config.get("model_max_length")
        return cls(
            tokenizer,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            chat_template=template if isinstance(template, str) else None,
            model_max_length=max_length if isinstance(max_length, int) and max_length < 2**31 else 1024,
        )


@cache
def _jinja_env() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )

    def tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        # transformers' own filter: plain JSON (Jinja's escapes <, > and & for HTML).
        return json.dumps(
            value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    return env


def train_tokenizer(
    files_or_texts: Iterable[Path | str], vocab_size: int, model_max_length: int = 1024
) -> Tokenizer:
    """Train byte-level BPE; a `Path` item is read as a UTF-8 file, a `str` item is the text itself.

    No normalizer and a prefix-space-free ByteLevel pre-tokenizer make decode(encode(s)) == s exact.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterable[str]:
        for item in files_or_texts:
            yield item.read_text(encoding="utf-8") if isinstance(item, Path) else item

    tok.train_from_iterator(texts(), trainer=trainer)
    return Tokenizer.from_str(tok.to_str(), model_max_length)


def copy_tokenizer_files(source: Path | str, destination: Path | str) -> None:
    """Copy a checkpoint's tokenizer files as they are: a fine-tuned model keeps its tokenizer byte for
    byte (its chat template and every transformers setting included), not our re-serialization of it."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, destination / name)
