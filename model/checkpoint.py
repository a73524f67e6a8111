"""Load and save checkpoint directories in Hugging Face's Llama layout, without pickle.

A directory holds config.json, model.safetensors (or shards listed in model.safetensors.index.json),
tokenizer files and generation_config.json. Our model fuses q/k/v and gate/up projections; this is
the one place that splits and joins them, so files keep HF's tensor names and load anywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from model.config import DTYPES, ConfigError, ModelConfig, token_ids
from model.transformer import Transformer

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Tensors some writers include that carry no learned state.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")

FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""The sampling settings a generation_config.json may recommend that an OpenAI-style request also has."""


@dataclass(frozen=True)
class GenerationConfig:
    """What a checkpoint's generation_config.json says about generating.

    transformers' `generate()` stops at any of its `eos_token_id`s, which may be more than config.json
    names (Llama 3's end-of-turn tokens). The sampling values are what the model's authors recommend.
    """

    eos_token_ids: tuple[int, ...] = ()
    sampling: dict[str, Any] = field(default_factory=dict)
    """The SAMPLING_KEYS the file sets, as written (the engine checks their ranges)."""
    max_new_tokens: int | None = None


def load_generation_config(directory: Path | str) -> GenerationConfig:
    """The directory's generation_config.json, or an empty one if it has none."""
    path = Path(directory) / GENERATION_CONFIG_FILE
    if not path.exists():
        return GenerationConfig()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    eos_ids = token_ids(data.get("eos_token_id"))
    if eos_ids is None:
        raise CheckpointError(
            f"{path}: eos_token_id must be a token id, a list of them or null, got {data['eos_token_id']!r}"
        )
    sampling = {key: data[key] for key in SAMPLING_KEYS if data.get(key) is not None}
    for key, value in sampling.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CheckpointError(f"{path}: {key} must be a number, got {value!r}")
    limit = data.get("max_new_tokens")
    if not (limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0)):
        raise CheckpointError(f"{path}: max_new_tokens must be a positive integer or null, got {limit!r}")
    return GenerationConfig(tuple(eos_ids), sampling, limit)


def _hf_name(ours: str) -> str:
    return ours if ours.startswith("lm_head.") else f"model.{ours}"


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our parameters under HF's names, fused matrices split; a tied lm_head is left out as HF does."""
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        for fused, parts in FUSED.items():
            if f".{fused}." in name:
                sizes = _fused_sizes(model.config, fused)
                for part, piece in zip(parts, tensor.split(sizes), strict=True):
                    out[_hf_name(name.replace(fused, part))] = piece
                break
        else:
            out[_hf_name(name)] = tensor
    return out


def _fused_sizes(config: ModelConfig, fused: str) -> list[int]:
    if fused == "self_attn.qkv_proj":
        kv = config.num_key_value_heads * config.head_dim
        return [config.num_attention_heads * config.head_dim, kv, kv]
    return [config.intermediate_size, config.intermediate_size]


def _expected_hf_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in to_hf_state_dict(model).items()}


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        # Shard names must be plain file names in this directory (no "../", no subfolders).
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()
        ):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / WEIGHTS_FILE
    if single.exists():
        return [single]
    pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in directory.glob(pattern))
    if pickled:
        raise CheckpointError(
            f"{directory}: only pickle weights found ({', '.join(pickled)}); convert them to safetensors"
        )
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def _read_tensors(files: list[Path]) -> Iterator[tuple[Path, str, Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield path, name, f.get_tensor(name)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def load_config(directory: Path | str) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    try:
        return ModelConfig.load(directory / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def load_model(
    directory: Path | str, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> Transformer:
    """Build the model described by `directory` and fill it from its safetensors files.

    Every expected tensor must be present with the right shape, and no unknown tensor may be
    left over: a mismatch is an error naming the file and the tensor, never a silent partial load.
    `dtype` defaults to the checkpoint's own torch_dtype.
    """
    directory = Path(directory)
    config = load_config(directory)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    dtype = dtype or config.dtype
    model = Transformer(config)
    expected = _expected_hf_shapes(model)
    loaded: dict[str, Tensor] = {}
    files = _safetensors_files(directory)
    for path, name, tensor in _read_tensors(files):
        if IGNORED_TENSORS.match(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for this config")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, config needs {expected[name]}"
            )
        loaded[name] = tensor
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        source = files[0] if len(files) == 1 else directory / INDEX_FILE
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more}")
    state = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        fused = next((f for f in FUSED if f".{f}." in name), None)
        if fused is None:
            state[name] = loaded[_hf_name(name)]
        else:
            state[name] = torch.cat([loaded[_hf_name(name.replace(fused, p))] for p in FUSED[fused]])
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=not config.tie_word_embeddings)
    return model.to(device=device, dtype=dtype).eval()


def save_model(model: Transformer, directory: Path | str, dtype: torch.dtype | None = None) -> None:
    """Write config.json, generation_config.json and model.safetensors (HF names, no pickle)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    config = ModelConfig(**{**model.config.__dict__, "torch_dtype": dtype_name})
    config.save(directory / CONFIG_FILE)
    generation = {"_from_model_config": True}
    if config.bos_token_id is not None:
        generation["bos_token_id"] = config.bos_token_id
    if config.eos_token_id is not None:
        generation["eos_token_id"] = config.eos_token_id
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_hf_state_dict(model).items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
