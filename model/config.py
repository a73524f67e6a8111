"""Model hyper-parameters, named exactly as Hugging Face's LlamaConfig names them.

Using HF's key names as our field names means `config.json` round-trips with no mapping table,
and any Llama checkpoint's config reads straight into this type.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

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
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype must be one of {sorted(DTYPES)}, got {self.torch_dtype!r}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ConfigError(f"rope_scaling must be an object, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "linear", "llama3"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
            needed = {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings")}
            absent = [k for k in needed.get(kind, ()) if k not in self.rope_scaling]
            if absent:
                raise ConfigError(f"rope_scaling type {kind!r} is missing key(s) {', '.join(absent)}")

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
        # transformers >= 5 writes rope settings as one `rope_parameters` dict.
        rope = data.get("rope_parameters")
        if isinstance(rope, dict):
            kwargs.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
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
