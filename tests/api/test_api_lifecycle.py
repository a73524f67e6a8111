"""Start-up (flags, environment, failures before the port opens) and graceful shutdown on SIGTERM."""

from __future__ import annotations

import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness import RunningServer, free_port, launch
from tests.support import assert_one_line_error, run_server, sse_events


def test_help_lists_every_flag_with_env_and_default() -> None:
    result = run_server("--help", timeout=30)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ("--port", "--max-waiting", "--kv-cache-memory", "--api-key", "--shutdown-grace-seconds"):
        assert flag in text
    assert "TINYSERVE_PORT" in text.replace(" ", "") and "default: 127.0.0.1" in text


def test_bad_weights_fail_in_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_one_line_error(run_server("--model", str(broken), "--port", str(free_port())), "model.safetensors")
    assert_one_line_error(
        run_server("--model", str(tmp_path / "missing"), "--port", str(free_port())), "missing"
    )


def test_impossible_kv_budget_fails_in_one_line(tiny_checkpoint: Path) -> None:
    result = run_server(
        "--model", str(tiny_checkpoint), "--port", str(free_port()), "--kv-cache-tokens", "16"
    )
    assert_one_line_error(result, "KV cache")


def test_port_in_use_fails_before_loading(tiny_checkpoint: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_server("--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--port", str(port))
    assert_one_line_error(result, "cannot bind", str(port))


def _stream(url: str, body: dict[str, Any], out: list[Any], accepted: threading.Event) -> None:
    """Read one stream into `out` (status, events...); a cut connection is recorded, not raised."""
    try:
        with (
            httpx.Client(base_url=url, timeout=60) as client,
            client.stream("POST", "/v1/completions", json=body) as r,
        ):
            out.append(r.status_code)
            accepted.set()
            out.extend(sse_events(r))
    except httpx.TransportError as exc:
        out.append(exc)
    finally:
        accepted.set()


DRAIN_TOKENS = 1000
"""Streams that must finish during the drain: seconds of decoding on any machine, well within its grace."""
CUT_TOKENS = 8000
"""Streams that must still run when the server gives up on them, however fast the machine."""


class Streams:
    """Long streams (on the long-context checkpoint) read in background threads; the constructor returns
    once the server has accepted each."""

    def __init__(self, server: RunningServer, count: int, tokens: int) -> None:
        body = {
            "model": server.model,
            "prompt": "drain",
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
        }
        self.outputs: list[list[Any]] = [[] for _ in range(count)]
        self.threads = []
        for out in self.outputs:
            accepted = threading.Event()
            thread = threading.Thread(target=_stream, args=(server.url, body, out, accepted), daemon=True)
            thread.start()
            assert accepted.wait(30) and out[0] == 200, out
            self.threads.append(thread)

    def join(self) -> list[list[Any]]:
        for thread in self.threads:
            thread.join(60)
        return self.outputs


def _wait_status(url: str, want: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/ready", timeout=2).status_code == want:
            return
        time.sleep(0.02)
    raise AssertionError(f"/ready never answered {want}")


def test_env_config_and_sigterm_lets_streams_finish(long_checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "TINYSERVE_MODEL": str(long_checkpoint), "TINYSERVE_HOST": "127.0.0.1", "TINYSERVE_PORT": str(port),
        "TINYSERVE_SERVED_MODEL_NAME": "from-env", "TINYSERVE_MAX_NUM_SEQS": "1",
        "TINYSERVE_SHUTDOWN_GRACE_SECONDS": "240", "TINYSERVE_LOG_PROMPTS": "1",
    }  # fmt: skip
    server = launch(long_checkpoint, tmp_path / "server.log", env=env)
    try:
        assert server.url.endswith(f":{port}")
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "from-env"
        server.model = "from-env"
        # Two long streams, one running at a time: still running when the signal comes.
        streams = Streams(server, 2, DRAIN_TOKENS)
        server.proc.send_signal(signal.SIGTERM)
        _wait_status(server.url, 503)
        late = httpx.post(f"{server.url}/v1/completions", json={"model": "from-env", "prompt": "late"})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert server.proc.wait(240) == 0
    finally:
        server.stop(signal.SIGKILL)
    for out in streams.join():
        assert out[0] == 200 and out[-1] == "[DONE]"
        chunks = out[1:-1]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    log = server.log()
    lines = [line for line in log.splitlines() if "serving from-env" in line]
    assert len(lines) == 1 and "parameters" in lines[0] and "KV cache" in lines[0]
    assert f"http://127.0.0.1:{port}" in lines[0] and "float32" in lines[0] and "cpu" in lines[0]
    # --log-prompts via the environment; the refused request never got as far as its prompt
    assert 'prompts="[\\"late\\"]"' not in log and 'prompts="[\\"drain\\"]"' in log


def test_sigterm_past_the_grace_period_ends_streams_with_an_error_event(
    start_server: Callable[..., RunningServer], long_checkpoint: Path
) -> None:
    server = start_server("--max-num-seqs", "1", "--shutdown-grace-seconds", "0.2", model=long_checkpoint)
    streams = Streams(server, 2, CUT_TOKENS)  # one running, one waiting
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    for out in streams.join():
        assert out[0] == 200 and out[-1] == "[DONE]"
        error = out[-2]["error"]
        assert error["code"] == "shutting_down" and set(error) == {"message", "type", "param", "code"}


def test_second_signal_exits_at_once(
    start_server: Callable[..., RunningServer], long_checkpoint: Path
) -> None:
    server = start_server("--max-num-seqs", "1", "--shutdown-grace-seconds", "600", model=long_checkpoint)
    streams = Streams(server, 2, CUT_TOKENS)  # far too long to finish before the second signal
    server.proc.send_signal(signal.SIGTERM)
    _wait_status(server.url, 503)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(60) != 0
    assert time.monotonic() - start < 15  # "at once": not the 600 s grace, nor 2 x 8000 decode steps
    assert all(out[-1] != "[DONE]" or "error" in out[-2] for out in streams.join())  # cut, not completed


def test_default_level_never_logs_prompts(server: RunningServer) -> None:
    secret = "a-very-distinctive-prompt-4242"
    r = httpx.post(
        f"{server.url}/v1/completions", json={"model": server.model, "prompt": secret, "max_tokens": 2}
    )
    assert r.status_code == 200
    text = r.json()["choices"][0]["text"]
    log = server.log()
    assert secret not in log and (not text.strip() or repr(text) not in log)


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes(server: RunningServer, path: str) -> None:
    assert httpx.get(f"{server.url}{path}").status_code == 200
