"""Flags and environment variables → Settings → EngineConfig (pure: no server, no torch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from server.engine.config import EngineConfig
from server.settings import Settings, build_parser, byte_size, env_name, parse_settings


def test_defaults_come_from_engine_config_and_bind_loopback() -> None:
    s = parse_settings(["--model", "weights/x"], env={})
    engine_defaults = EngineConfig(model=Path("weights/x"))
    assert s.engine_config() == engine_defaults
    assert (s.host, s.port, s.api_key, s.cors_origins, s.log_prompts) == ("127.0.0.1", 8000, None, (), False)
    assert s.model_name == "x"


def test_every_flag_maps_onto_engine_config() -> None:
    argv = [
        "--model", "m", "--device", "cuda:1", "--dtype", "bfloat16", "--quantization", "int8",
        "--max-model-len", "256",
        "--kv-cache-tokens", "4096", "--kv-cache-memory", "2G", "--block-size", "32", "--max-num-seqs", "8",
        "--max-waiting", "3", "--prefill-chunk-tokens", "64", "--no-prefix-caching", "--deterministic",
        "--enforce-eager", "--grammar-compile-timeout", "2.5", "--threads", "2", "--seed", "7",
    ]  # fmt: skip
    config = parse_settings(argv, env={}).engine_config()
    assert config == EngineConfig(
        model=Path("m"), device="cuda:1", dtype="bfloat16", quantization="int8", max_model_len=256,
        kv_cache_tokens=4096,
        kv_cache_memory=2 << 30, block_size=32, max_num_seqs=8, max_waiting=3, prefill_chunk_tokens=64,
        enable_prefix_caching=False, deterministic=True, enforce_eager=True, grammar_compile_timeout=2.5,
        num_threads=2, seed=7,
    )  # fmt: skip


def test_environment_sets_every_flag_and_the_command_line_wins() -> None:
    env = {
        "TINYSERVE_MODEL": "weights/a", "TINYSERVE_PORT": "9001", "TINYSERVE_API_KEY": "k",
        "TINYSERVE_CORS_ORIGINS": "http://a.example, http://b.example", "TINYSERVE_LOG_PROMPTS": "yes",
        "TINYSERVE_NO_PREFIX_CACHING": "1", "TINYSERVE_KV_CACHE_MEMORY": "512M", "TINYSERVE_DTYPE": "float16",
    }  # fmt: skip
    s = parse_settings([], env=env)
    assert s.model == Path("weights/a") and s.port == 9001 and s.api_key == "k"
    assert s.cors_origins == ("http://a.example", "http://b.example")
    assert s.log_prompts and s.no_prefix_caching and s.kv_cache_memory == 512 << 20 and s.dtype == "float16"
    assert parse_settings(["--port", "9002"], env=env).port == 9002
    assert parse_settings(["--api-key", "other"], env=env).public()["api_key"] == "***"


def test_every_settings_field_has_a_flag_and_an_env_var_in_help() -> None:
    help_text = build_parser({}).format_help()
    for f in dataclasses.fields(Settings):
        assert "--" + f.name.replace("_", "-") in help_text
        assert env_name(f.name) in help_text.replace("\n", "").replace(" ", "")


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--model", "m", "--port", "70000"], {}),
        (["--model", "m", "--max-num-seqs", "0"], {}),
        (["--model", "m", "--dtype", "int8"], {}),
        (["--model", "m", "--shutdown-grace-seconds", "-1"], {}),
        (["--model", "m", "--grammar-compile-timeout", "0"], {}),
        (["--model", "m"], {"TINYSERVE_PORT": "eighty"}),
        (["--model", "m"], {"TINYSERVE_DEBUG_SOMETHING": "1", "TINYSERVE_DETERMINISTIC": "maybe"}),
        (["--model", "m"], {"TINYSERVE_DTYPE": "int8"}),
        (["--model", "m", "--quantization", "int4"], {}),
        (["--model", "m"], {"TINYSERVE_QUANTIZATION": "fp8"}),
        ([], {}),
    ],
)
def test_bad_flags_exit_with_usage(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, env=env)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_byte_sizes() -> None:
    assert byte_size("1024") == 1024
    assert byte_size("4k") == 4096
    assert byte_size("1.5G") == 3 << 29
    assert byte_size("2GiB") == 2 << 30
    with pytest.raises(ValueError):
        byte_size("lots")
