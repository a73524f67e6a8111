"""Checkpoint directories: the sharded HF layout, the reverse direction, and bad inputs failing clearly."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from model.checkpoint import CheckpointError, load_model, save_model, to_hf_state_dict
from model.config import ModelConfig
from model.transformer import Transformer
from tests.model.model_helpers import one_thread, randomize_  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "model.safetensors"


def tiny_config(**overrides: Any) -> ModelConfig:
    kwargs: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return ModelConfig(**{**kwargs, **overrides})


def tiny_model(seed: int = 0, **overrides: Any) -> Transformer:
    model = Transformer(tiny_config(**overrides)).eval()
    randomize_(model, seed)
    return model


def ids_for(vocab_size: int, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# Good checkpoints
# ---------------------------------------------------------------------------------------------------


def test_sharded_transformers_checkpoint_loads_and_matches(tmp_path: Path) -> None:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = LlamaForCausalLM(config).eval()
    randomize_(hf, seed=0)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / WEIGHTS).exists()
    assert len(shards) >= 2, shards
    ours = load_model(tmp_path)
    ids = ids_for(256)
    with torch.no_grad():
        assert max_diff(ours(ids), hf(ids).logits) <= 1e-4
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False)
    assert ours.generate(ids, max_new_tokens=20).tolist() == ref.tolist()


REVERSE_CASES: dict[str, dict[str, Any]] = {
    "gqa": {},
    "tied_bias": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-2),
    "llama3_rope": dict(
        rope_theta=500000.0,
        num_key_value_heads=1,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "head_dim_linear_rope": dict(head_dim=24, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("case", list(REVERSE_CASES))
def test_saved_checkpoint_loads_in_transformers(case: str, tmp_path: Path) -> None:
    ours = tiny_model(seed=1, **REVERSE_CASES[case])
    save_model(ours, tmp_path)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.dtype == torch.float32
    cfg = ours.config
    assert hf.config.rms_norm_eps == cfg.rms_norm_eps
    assert hf.config.tie_word_embeddings == cfg.tie_word_embeddings
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf.config.rope_parameters["rope_type"] == (cfg.rope_scaling or {}).get("rope_type", "default")
    ids = ids_for(cfg.vocab_size, seed=1)
    with torch.no_grad():
        assert max_diff(hf.eval()(ids).logits, ours(ids)) <= 1e-4
    # And back: our load of our own file is the identical model.
    again = load_model(tmp_path)
    assert again.config == cfg
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bfloat16_save_loads_in_transformers_as_bfloat16(tmp_path: Path) -> None:
    ours = tiny_model(seed=2)
    save_model(ours, tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    loaded = load_model(tmp_path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").eval()
    assert hf.dtype == torch.bfloat16
    ids = ids_for(ours.config.vocab_size, seed=2)
    with torch.no_grad():
        assert max_diff(hf(ids).logits, loaded(ids)) <= 0.01


def test_tied_checkpoint_shares_embedding_and_omits_lm_head(tmp_path: Path) -> None:
    ours = tiny_model(seed=3, tie_word_embeddings=True)
    assert "lm_head.weight" not in to_hf_state_dict(ours)
    save_model(ours, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, ours.embed_tokens.weight)


def test_transformers_config_keys_read_into_model_config(tmp_path: Path) -> None:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 50000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    hf_config = LlamaConfig(
        vocab_size=131,
        hidden_size=72,
        intermediate_size=100,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_parameters=rope,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=[2, 7],
        dtype="bfloat16",
    )
    hf_config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    cfg = ModelConfig.from_hf_dict(data)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rms_norm_eps) == (12, 2, 1e-6)
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling is not None
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2, 7) and cfg.dtype == torch.bfloat16
    # A leftover `"rope_scaling": null` next to rope_parameters must not drop the scaling.
    assert ModelConfig.from_hf_dict({**data, "rope_scaling": None}).rope_scaling == cfg.rope_scaling
    # As in transformers 5, rope_parameters' theta wins over a top-level one.
    assert ModelConfig.from_hf_dict({**data, "rope_theta": 1234.0}).rope_theta == 50000.0


# ---------------------------------------------------------------------------------------------------
# Bad checkpoints: one-line CheckpointError naming the file and the problem
# ---------------------------------------------------------------------------------------------------


def edit_config(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(directory: Path, change: Callable[[dict[str, Tensor]], None]) -> None:
    path = directory / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(tensors)
    save_file(tensors, str(path))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def _pop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.pop(key)


def _set(**items: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.update(items)


BAD_CONFIGS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing_config": (lambda d: (d / "config.json").unlink(), ["config.json", "not found"]),
    "config_not_json": (
        lambda d: (d / "config.json").write_text('{"vocab_size": 2'),
        ["config.json", "JSON"],
    ),
    "config_not_object": (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "object"]),
    "missing_required_key": (
        lambda d: edit_config(d, _pop("hidden_size")),
        ["config.json", "missing", "hidden_size"],
    ),
    "unknown_model_type": (
        lambda d: edit_config(d, _set(model_type="gpt2")),
        ["config.json", "model_type", "gpt2"],
    ),
    "no_model_type": (lambda d: edit_config(d, _pop("model_type")), ["config.json", "model_type"]),
    "heads_not_divisible": (
        lambda d: edit_config(d, _set(num_key_value_heads=3)),
        ["config.json", "num_attention_heads 4", "num_key_value_heads 3", "divisible"],
    ),
    "zero_heads": (
        # Without head_dim in the file, head_dim is derived by dividing by the head count.
        lambda d: edit_config(d, lambda c: (c.pop("head_dim"), c.update(num_attention_heads=0))),
        ["config.json", "num_attention_heads", "positive integer"],
    ),
    "string_size": (
        lambda d: edit_config(d, _set(hidden_size="64")),
        ["config.json", "hidden_size", "positive integer"],
    ),
    "unsupported_activation": (
        lambda d: edit_config(d, _set(hidden_act="prelu")),
        ["config.json", "hidden_act", "prelu"],
    ),
    "activation_not_a_name": (
        lambda d: edit_config(d, _set(hidden_act=["silu"])),
        ["config.json", "hidden_act", "['silu']"],
    ),
    "batch_dependent_rope_type": (
        lambda d: edit_config(d, _set(rope_scaling={"rope_type": "dynamic", "factor": 4.0})),
        ["config.json", "rope_scaling", "dynamic"],
    ),
    "rope_factor_string": (
        lambda d: edit_config(d, _set(rope_scaling={"rope_type": "yarn", "factor": "4"})),
        ["config.json", "rope_scaling factor", "'4'"],
    ),
    "rope_factor_zero": (
        lambda d: edit_config(d, _set(rope_scaling={"rope_type": "linear", "factor": 0})),
        ["config.json", "rope_scaling factor", "positive"],
    ),
    "llama3_frequency_band_empty": (
        lambda d: edit_config(
            d, _set(rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4})
        ),
        ["config.json", "low_freq_factor", "high_freq_factor"],
    ),
    "yarn_theta_one": (
        lambda d: edit_config(d, _set(rope_theta=1, rope_scaling={"rope_type": "yarn", "factor": 2.0})),
        ["config.json", "rope_theta", "yarn"],
    ),
    "negative_rope_theta": (
        lambda d: edit_config(d, _set(rope_theta=-10000.0)),
        ["config.json", "rope_theta", "positive"],
    ),
    "norm_eps_string": (
        lambda d: edit_config(d, _set(rms_norm_eps="1e-5")),
        ["config.json", "rms_norm_eps", "'1e-5'"],
    ),
    "tie_flag_string": (
        lambda d: edit_config(d, _set(tie_word_embeddings="yes")),
        ["config.json", "tie_word_embeddings", "'yes'"],
    ),
    "eos_id_string": (
        lambda d: edit_config(d, _set(eos_token_id=["2"])),
        ["config.json", "eos_token_id", "['2']"],
    ),
    "rope_scaling_not_object": (
        lambda d: edit_config(d, _set(rope_scaling="linear")),
        ["config.json", "rope_scaling", "object"],
    ),
    "llama3_rope_without_factor": (
        lambda d: edit_config(
            d, _set(rope_scaling={"rope_type": "llama3", "original_max_position_embeddings": 8})
        ),
        ["config.json", "llama3", "factor"],
    ),
    "unknown_dtype": (
        lambda d: edit_config(d, _set(torch_dtype="float8")),
        ["config.json", "torch_dtype", "float8"],
    ),
}

BAD_WEIGHTS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing_tensor": (
        lambda d: edit_tensors(d, _pop(DOWN1)),
        [WEIGHTS, "missing tensor", DOWN1],
    ),
    "wrong_shape": (
        lambda d: edit_tensors(d, lambda t: t.update({Q0: t[Q0][:, :-1].contiguous()})),
        [WEIGHTS, Q0, "shape", "(64, 63)", "(64, 64)"],
    ),
    "unexpected_tensor": (
        lambda d: edit_tensors(
            d, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": t[DOWN1].T.contiguous()})
        ),
        [WEIGHTS, "unexpected tensor", "model.layers.2.mlp.up_proj.weight"],
    ),
    "truncated_weights": (lambda d: truncate(d / WEIGHTS), [WEIGHTS, "safetensors"]),
    "weights_not_safetensors": (
        lambda d: (d / WEIGHTS).write_bytes(b"\x00" * 64),
        [WEIGHTS, "safetensors"],
    ),
    "no_weights": (lambda d: (d / WEIGHTS).unlink(), [WEIGHTS, "model.safetensors.index.json"]),
}


@pytest.mark.parametrize("case", [*BAD_CONFIGS, *BAD_WEIGHTS])
def test_bad_checkpoint_fails_with_one_line_error(case: str, tmp_path: Path) -> None:
    save_model(tiny_model(seed=4), tmp_path)
    corrupt, words = {**BAD_CONFIGS, **BAD_WEIGHTS}[case]
    corrupt(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert_one_line_naming(str(info.value), tmp_path, words)


def assert_one_line_naming(message: str, directory: Path, words: list[str]) -> None:
    assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    assert str(directory) in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_missing_directory_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint directory") as info:
        load_model(tmp_path / "nope")
    assert_one_line_naming(str(info.value), tmp_path / "nope", [])


class _Payload:
    """Unpickling this creates a file: proof that the loader executed pickle."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.sentinel), "w"))


def test_pickle_only_checkpoint_is_refused_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_model(tiny_model(seed=5), tmp_path)
    (tmp_path / WEIGHTS).unlink()
    sentinel = tmp_path.parent / f"{tmp_path.name}-unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader tried to unpickle")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, forbidden)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert_one_line_naming(str(info.value), tmp_path, ["pytorch_model.bin", "pickle", "safetensors"])
    assert not sentinel.exists()


def make_sharded(directory: Path) -> list[str]:
    hf_config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(hf_config).save_pretrained(directory, max_shard_size="50KB")
    shards = sorted(p.name for p in directory.glob("model-*.safetensors"))
    assert len(shards) >= 2
    load_model(directory)  # the intact directory loads
    return shards


INDEX = "model.safetensors.index.json"


def _edit_index(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((directory / INDEX).read_text())
    change(data)
    (directory / INDEX).write_text(json.dumps(data))


def _drop_from_index(directory: Path, name: str) -> None:
    _edit_index(directory, lambda d: d["weight_map"].pop(name))


BAD_SHARDED: dict[str, tuple[Callable[[Path, list[str]], None], Callable[[list[str]], list[str]]]] = {
    "index_not_json": (
        lambda d, s: (d / INDEX).write_text('{"weight_map": {'),
        lambda s: [INDEX, "index"],
    ),
    "index_binary_garbage": (
        lambda d, s: (d / INDEX).write_bytes(b"\xff\xfe\x00garbage"),
        lambda s: [INDEX, "index"],
    ),
    "index_without_weight_map": (
        lambda d, s: (d / INDEX).write_text('{"metadata": {}}'),
        lambda s: [INDEX, "index", "weight_map"],
    ),
    "weight_map_not_a_dict": (
        lambda d, s: _edit_index(d, lambda x: x.update(weight_map=s)),
        lambda s: [INDEX, "weight_map"],
    ),
    "weight_map_escapes_directory": (
        lambda d, s: _edit_index(d, lambda x: x["weight_map"].update({Q0: "../elsewhere.safetensors"})),
        lambda s: [INDEX, "weight_map"],
    ),
    "missing_shard": (lambda d, s: (d / s[-1]).unlink(), lambda s: [s[-1], "not found"]),
    "truncated_shard": (lambda d, s: truncate(d / s[0]), lambda s: [s[0], "safetensors"]),
}


@pytest.mark.parametrize("case", list(BAD_SHARDED))
def test_bad_sharded_checkpoint_fails_with_one_line_error(case: str, tmp_path: Path) -> None:
    shards = make_sharded(tmp_path)
    corrupt, words = BAD_SHARDED[case]
    corrupt(tmp_path, shards)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert_one_line_naming(str(info.value), tmp_path, words(shards))


def test_shard_left_out_of_index_is_a_missing_tensor(tmp_path: Path) -> None:
    shards = make_sharded(tmp_path)
    index = json.loads((tmp_path / INDEX).read_text())
    dropped = [name for name, shard in index["weight_map"].items() if shard == shards[0]]
    for name in dropped:
        _drop_from_index(tmp_path, name)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert_one_line_naming(str(info.value), tmp_path, [INDEX, "missing tensor", sorted(dropped)[0]])
