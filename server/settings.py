"""Every server flag, its environment variable and its default, in one place.

Each flag `--some-flag` can also be set as `TINYSERVE_SOME_FLAG`; a flag on the command line wins.
Engine defaults are read from `EngineConfig` so they are declared once. This module imports
neither torch nor the engine, so `python -m server --help` answers at once.
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

from model.quantization import QUANTIZATIONS
from server.engine.config import EngineConfig

ENV_PREFIX = "TINYSERVE_"
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def _engine_default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(EngineConfig) if f.name == name)


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


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be in [0, 65535], got {text}")
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
class Settings:
    """The parsed command line: engine knobs (mapped onto EngineConfig) and HTTP knobs."""

    model: Path = field(metadata=flag("checkpoint directory (config.json, model.safetensors, tokenizer)"))
    served_model_name: str | None = field(
        default=None, metadata=flag("model id clients must send (default: the directory's name)")
    )
    # HTTP
    host: str = field(default="127.0.0.1", metadata=flag("interface to bind; 0.0.0.0 exposes the server"))
    port: int = field(default=8000, metadata=flag("TCP port (0 picks a free one)", type=port_number))
    api_key: str | None = field(
        default=None,
        metadata=flag("require 'Authorization: Bearer KEY' on every route but /health", secret=True),
    )
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata=flag("comma-separated origins allowed by CORS, or '*' (default: none)", type=origins),
    )
    metrics_without_auth: bool = field(default=False, metadata=flag("serve /metrics without the API key"))
    shutdown_grace_seconds: float = field(
        default=30.0,
        metadata=flag(
            "on SIGTERM, how long running requests may finish before they are ended", type=non_negative_float
        ),
    )
    max_body_bytes: int = field(
        default=8 << 20, metadata=flag("largest request body accepted (413 beyond)", type=byte_size)
    )
    log_prompts: bool = field(default=False, metadata=flag("log prompts and outputs (off: never logged)"))
    log_level: str = field(default="info", metadata=flag("logging level", choices=LOG_LEVELS))
    # Engine
    device: str = field(
        default=_engine_default("device"),
        metadata=flag("torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1"),
    )
    dtype: str | None = field(
        default=_engine_default("dtype"),
        metadata=flag("compute dtype (default: the checkpoint's)", choices=DTYPE_CHOICES),
    )
    quantization: str | None = field(
        default=_engine_default("quantization"),
        metadata=flag(
            "weight-only quantization: int8 halves bfloat16's bytes per step (CPU)", choices=QUANTIZATIONS
        ),
    )
    max_model_len: int | None = field(
        default=_engine_default("max_model_len"),
        metadata=flag("context length served (default: the model's)", type=positive_int),
    )
    kv_cache_tokens: int | None = field(
        default=_engine_default("kv_cache_tokens"),
        metadata=flag("KV cache size in tokens (default: derived from --kv-cache-memory)", type=positive_int),
    )
    kv_cache_memory: int = field(
        default=_engine_default("kv_cache_memory"),
        metadata=flag("KV cache budget in bytes, e.g. 512M or 2G", type=byte_size),
    )
    block_size: int = field(
        default=_engine_default("block_size"),
        metadata=flag("KV cache page size in tokens", type=positive_int),
    )
    max_num_seqs: int = field(
        default=_engine_default("max_num_seqs"),
        metadata=flag("most sequences decoded together", type=positive_int),
    )
    max_waiting: int = field(
        default=_engine_default("max_waiting"),
        metadata=flag("most requests queued; beyond it new ones get 503 + Retry-After", type=positive_int),
    )
    max_buffered_events: int = field(
        default=_engine_default("max_buffered_events"),
        metadata=flag(
            "most undelivered events per request; a client further behind is cut", type=positive_int
        ),
    )
    prefill_chunk_tokens: int = field(
        default=_engine_default("prefill_chunk_tokens"),
        metadata=flag("most prompt tokens computed per step", type=positive_int),
    )
    no_prefix_caching: bool = field(
        default=False, metadata=flag("do not reuse the KV of shared prompt prefixes")
    )
    deterministic: bool = field(
        default=_engine_default("deterministic"), metadata=flag("batch-invariant results (slower)")
    )
    enforce_eager: bool = field(
        default=_engine_default("enforce_eager"),
        metadata=flag("run every step eagerly: no compiled decode graphs (faster start, slower decode)"),
    )
    threads: int | None = field(
        default=_engine_default("num_threads"),
        metadata=flag("torch CPU threads (default: torch's)", type=positive_int),
    )
    seed: int = field(
        default=_engine_default("seed"), metadata=flag("engine seed for unseeded requests", type=int)
    )

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.resolve().name

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            quantization=self.quantization,
            max_model_len=self.max_model_len,
            kv_cache_tokens=self.kv_cache_tokens,
            kv_cache_memory=self.kv_cache_memory,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_waiting=self.max_waiting,
            max_buffered_events=self.max_buffered_events,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            enable_prefix_caching=not self.no_prefix_caching,
            deterministic=self.deterministic,
            enforce_eager=self.enforce_eager,
            num_threads=self.threads,
            seed=self.seed,
        )

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
        convert = meta["type"] or (Path if f.name == "model" else str)
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
    if f.name == "kv_cache_memory" or f.name == "max_body_bytes":
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
