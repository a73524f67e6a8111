"""Every server flag, its environment variable and its default, in one place.

Each flag `--some-flag` can also be set as `TINYSERVE_SOME_FLAG`; a flag on the command line wins.
The HTTP knobs are declared here; the engine's are `EngineConfig`'s fields (name, default, help),
turned into flags by `_with_engine_flags`, so each is declared once. This module imports neither
torch nor the engine's code, so `python -m server --help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.dtypes import DTYPE_NAMES, QUANTIZATIONS
from server.engine.config import GENERATION_CONFIGS, SPECULATIVE_METHODS, EngineConfig

ENV_PREFIX = "TINYSERVE_"
LOG_LEVELS = ("debug", "info", "warning", "error")
UI_MODES = ("auto", "chat", "completion")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"must be a finite number > 0, got {text}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be in [0, 65535], got {text}")
    return value


def listen_port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(f"must be in [1, 65535], got {text}")
    return value


def byte_size(text: str) -> int:
    """`1073741824`, `512M`, `1G` or `1GiB` (powers of 1024) as a byte count."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1073741824, 512M, 2G)")
    number, unit, _ = match.groups()
    value = int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))
    if value <= 0:
        raise ValueError(f"must be positive, got {text}")
    return value


def origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


def flag(
    help: str,
    *,
    type: Callable[[str], Any] | None = None,
    choices: Sequence[str] | None = None,
    secret: bool = False,
) -> dict[str, Any]:
    """Field metadata from which the argparse flag and its environment variable are built."""
    return {"help": help, "type": type, "choices": choices, "secret": secret}


@dataclass(frozen=True)
class EngineFlag:
    """How an EngineConfig field shows on the command line where its name and type do not say it."""

    name: str | None = None
    """The flag's name, if not the field's."""
    negated: bool = False
    """A boolean that defaults to true is offered as its opposite (`--no-...`)."""
    type: Callable[[str], Any] | None = None
    """The parser (default: a positive integer for int fields, the text itself otherwise)."""
    choices: Sequence[str] | None = None


ENGINE_FLAGS = {
    "model": EngineFlag(type=Path),
    "dtype": EngineFlag(choices=DTYPE_NAMES),
    "quantization": EngineFlag(choices=QUANTIZATIONS),
    "generation_config": EngineFlag(choices=GENERATION_CONFIGS),
    "speculative_method": EngineFlag(choices=SPECULATIVE_METHODS),
    "speculative_model": EngineFlag(type=Path),
    "kv_cache_memory": EngineFlag(type=byte_size),
    "grammar_compile_timeout": EngineFlag(type=positive_float),
    "enable_prefix_caching": EngineFlag(name="no_prefix_caching", negated=True),
    "num_threads": EngineFlag(name="threads"),
    "seed": EngineFlag(type=int),
}


def _with_engine_flags(cls: type) -> type:
    """Give `cls` (before @dataclass) a field per EngineConfig field: `model` first, the rest last."""
    fields: dict[str, tuple[str, Any]] = {}
    for f in dataclasses.fields(EngineConfig):
        spec = ENGINE_FLAGS.get(f.name, EngineFlag())
        kind = "bool" if spec.negated else str(f.type)
        convert = spec.type or (positive_int if kind.startswith("int") else None)
        help = f"do not {f.metadata['help']}" if spec.negated else f.metadata["help"]
        metadata = {**flag(help, type=convert, choices=spec.choices), "engine_field": f.name}
        if spec.negated:
            metadata["negated"] = True
        default = (not f.default) if spec.negated else f.default
        made = dataclasses.field(metadata=metadata) if default is dataclasses.MISSING else None
        fields[spec.name or f.name] = (kind, made or dataclasses.field(default=default, metadata=metadata))
    own = dict(cls.__annotations__)
    cls.__annotations__ = {"model": fields["model"][0], **own}
    cls.__annotations__.update((name, kind) for name, (kind, _) in fields.items() if name != "model")
    for name, (_, made) in fields.items():
        setattr(cls, name, made)
    return cls


@dataclass(frozen=True)
@_with_engine_flags
class Settings:
    """The parsed command line: HTTP knobs, then one field per EngineConfig knob (`engine_config()`)."""

    served_model_name: str | None = field(
        default=None, metadata=flag("model id clients must send (default: the directory's name)")
    )
    host: str = field(default="127.0.0.1", metadata=flag("interface to bind; 0.0.0.0 exposes the server"))
    port: int = field(default=8000, metadata=flag("TCP port (0 picks a free one)", type=port_number))
    api_key: str | None = field(
        default=None,
        metadata=flag(
            "require 'Authorization: Bearer KEY' on every route but /health and /ready", secret=True
        ),
    )
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata=flag("comma-separated origins allowed by CORS, or '*' (default: none)", type=origins),
    )
    metrics_without_auth: bool = field(default=False, metadata=flag("serve /metrics without the API key"))
    metrics_port: int | None = field(
        default=None,
        metadata=flag(
            "also serve /metrics, alone and without the API key, on this port of --host", type=listen_port
        ),
    )
    shutdown_grace_seconds: float = field(
        default=30.0,
        metadata=flag(
            "on SIGTERM, how long running requests may finish before they are ended", type=non_negative_float
        ),
    )
    max_body_bytes: int = field(
        default=8 << 20, metadata=flag("largest request body accepted (413 beyond)", type=byte_size)
    )
    max_header_bytes: int = field(
        default=16 << 10,
        metadata=flag("largest request line and headers accepted (431 beyond)", type=byte_size),
    )
    header_timeout: float = field(
        default=10.0,
        metadata=flag(
            "seconds a request's line and headers may take to arrive (408 beyond)", type=positive_float
        ),
    )
    body_timeout: float = field(
        default=60.0,
        metadata=flag("seconds a request's body may take to arrive (408 beyond)", type=positive_float),
    )
    max_connections: int = field(
        default=512,
        metadata=flag("most open connections; each one beyond is answered 503 and closed", type=positive_int),
    )
    log_prompts: bool = field(default=False, metadata=flag("log prompts and outputs (off: never logged)"))
    ui_mode: str = field(
        default="auto",
        metadata=flag(
            "the chat page's mode at load; auto: completion for a base model (no chat template of its "
            "own), chat otherwise",
            choices=UI_MODES,
        ),
    )
    log_level: str = field(default="info", metadata=flag("logging level", choices=LOG_LEVELS))

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine_config().model.resolve().name

    def engine_config(self) -> EngineConfig:
        values = {}
        for f in dataclasses.fields(self):
            if "engine_field" in f.metadata:
                value = getattr(self, f.name)
                values[f.metadata["engine_field"]] = not value if f.metadata.get("negated") else value
        return EngineConfig(**values)

    def public(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for logs."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("secret") and out[f.name] is not None:
                out[f.name] = "***"
        return out


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _is_bool(f: dataclasses.Field[Any]) -> bool:
    return f.type in ("bool", bool)


def _parse_env_bool(name: str, text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{name}={text!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def _argparse_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a converter so argparse prints its message instead of 'invalid value'."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc) or f"invalid value {text!r}") from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """An argparse parser whose defaults come from `env`, then from the dataclass."""
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="OpenAI-compatible text-generation server. Every flag can also be set through the "
        f"environment variable shown beside it ({ENV_PREFIX}<FLAG>); a flag given on the command line wins.",
    )
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        name, variable = _flag_name(f.name), env_name(f.name)
        required = f.default is dataclasses.MISSING
        shown = "required" if required else f"default: {_show_default(f)}"
        help_text = f"{meta['help']} [env {variable}; {shown}]"
        if _is_bool(f):
            default = _parse_env_bool(variable, env[variable]) if variable in env else f.default
            parser.add_argument(name, action="store_true", default=default, help=help_text)
            continue
        convert = meta["type"] or str
        kwargs: dict[str, Any] = {
            "type": _argparse_type(convert),
            "help": help_text,
            "metavar": f.name.upper(),
        }
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if variable in env:
            try:
                kwargs["default"] = convert(env[variable])
            except ValueError as exc:
                raise ValueError(f"{variable}={env[variable]!r}: {exc}") from None
            if meta["choices"] and kwargs["default"] not in meta["choices"]:
                raise ValueError(f"{variable}={env[variable]!r}: choose from {', '.join(meta['choices'])}")
        elif required:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        parser.add_argument(name, **kwargs)
    return parser


def _show_default(f: dataclasses.Field[Any]) -> str:
    if f.default is None or f.default == ():
        return "none"
    if f.metadata["type"] is byte_size:
        return f"{f.default} bytes"
    return str(f.default)


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Flags and environment → Settings. Bad values exit with argparse's usage message (status 2)."""
    env = os.environ if env is None else env
    try:
        parser = build_parser(env)
    except ValueError as exc:
        argparse.ArgumentParser(prog="python -m server").error(str(exc))
    args = parser.parse_args(argv)
    return Settings(**vars(args))
