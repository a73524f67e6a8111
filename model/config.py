"""Model hyper-parameters, named exactly as Hugging Face's LlamaConfig names them.

Using HF's key names as our field names means `config.json` round-trips with no mapping table,
and any Llama checkpoint's config reads straight into this type.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from model.activations import ACTIVATIONS
from model.dtypes import DTYPE_NAMES


class ConfigError(ValueError):
    """A config that cannot describe a model we can run; the message names the problem."""


DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}

REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""transformers' rope types whose angles depend on the position alone. Left out: `dynamic` and
`longrope`, whose angles transformers picks from the longest sequence in each forward pass (so a
token's keys would depend on what it was batched with), and types no Llama config takes."""

ROPE_NUMBERS = {
    "factor": True,
    "original_max_position_embeddings": True,
    "low_freq_factor": True,
    "high_freq_factor": True,
    "attention_factor": True,
    "beta_fast": False,
    "beta_slow": False,
    "mscale": False,
    "mscale_all_dim": False,
}
"""rope_scaling's numeric keys, and whether each must be positive (the rope tables divide by those)."""


def _check_number(name: str, value: Any, positive: bool) -> None:
    """A finite real number, above 0 if `positive` (JSON gives ints and floats; a bool is neither here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


def _is_token_id(value: Any) -> bool:
    """A non-negative int as JSON gives it (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def token_ids(value: Any) -> list[int] | None:
    """An `eos_token_id` as HF files write it (null, an id or a list of ids) as a list; None if invalid."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    return ids if all(map(_is_token_id, ids)) else None


def _check_rope_scaling(scaling: Any, theta: float) -> None:
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported ({', '.join(ROPE_TYPES)})")
    needed = {"linear": ("factor",), "llama3": ("factor",)}
    absent = [k for k in needed.get(kind, ()) if scaling.get(k) is None]
    if absent:
        raise ConfigError(f"rope_scaling type {kind!r} is missing key(s) {', '.join(absent)}")
    for key, positive in ROPE_NUMBERS.items():
        if scaling.get(key) is not None:
            _check_number(f"rope_scaling {key}", scaling[key], positive)
    if kind == "llama3" and scaling.get("low_freq_factor", 1.0) >= scaling.get("high_freq_factor", 4.0):
        raise ConfigError("rope_scaling low_freq_factor must be below high_freq_factor")
    if kind == "yarn" and theta == 1:
        raise ConfigError("rope_theta must not be 1 with yarn rope scaling (its ramp divides by its log)")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in REQUIRED_KEYS:  # before they are used as divisors below
            _check_positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported (one of {', '.join(sorted(ACTIVATIONS))})"
            )
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype must be one of {sorted(DTYPES)}, got {self.torch_dtype!r}")
        _check_number("rms_norm_eps", self.rms_norm_eps, positive=False)
        if self.rms_norm_eps < 0:
            raise ConfigError(f"rms_norm_eps must not be negative, got {self.rms_norm_eps!r}")
        _check_number("rope_theta", self.rope_theta, positive=True)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.rope_theta)
        if not (self.bos_token_id is None or _is_token_id(self.bos_token_id)):
            raise ConfigError(f"bos_token_id must be a token id or null, got {self.bos_token_id!r}")
        if token_ids(self.eos_token_id) is None:
            raise ConfigError(
                f"eos_token_id must be a token id, a list of them or null, got {self.eos_token_id!r}"
            )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes alone (no model needed)."""
        h, d, kv = self.hidden_size, self.head_dim, self.num_key_value_heads
        attn = h * d * (self.num_attention_heads * 2 + kv * 2)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.num_hidden_layers * per_layer + h

    def to_hf_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out.update(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            attention_dropout=0.0,
            initializer_range=0.02,
            pretraining_tp=1,
            use_cache=True,
        )
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        model_type = data.get("model_type")
        if model_type != "llama":
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported (only 'llama')")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        # transformers >= 5 writes rope settings as one `rope_parameters` dict, whose theta wins.
        rope = data.get("rope_parameters")
        if isinstance(rope, dict):
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default" and kwargs.get("rope_scaling") is None:
                kwargs["rope_scaling"] = rope  # also over a leftover `"rope_scaling": null`
        dtype = kwargs.get("torch_dtype") or data.get("dtype") or "float32"
        kwargs["torch_dtype"] = str(dtype).removeprefix("torch.")
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data, source=str(path))
