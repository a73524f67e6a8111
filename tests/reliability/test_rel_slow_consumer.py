"""Slow consumers do not stall other streams: a client that reads nothing for seconds (with a tiny
receive window, so the server's socket buffers fill) while three others stream. The others'
inter-token latency stays normal, the engine never waits for the slow client, and when it resumes it
gets its full output.

How the server buffers (measured here, printed): the engine finishes the slow request at its own pace
and its events wait in the request's queue in the server's memory; the buffer is bounded by the
request's size (n x max_tokens events), not by a byte limit, and a client that never reads is never
timed out.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.harness import RunningServer
from tests.reliability.rel_support import (
    build_request,
    iter_body,
    iter_sse,
    json_body,
    open_connection,
    port_of,
    read_head,
    request,
    stream_text,
)
from tests.support import wait_idle

OTHERS = 3
OTHER_TOKENS = 150
STALL_S = 3.0
SLOW = {
    "prompt": "slow reader",
    "max_tokens": 480,
    "n": 4,
    "logprobs": 5,
    "temperature": 0,
    "ignore_eos": True,
}


async def timed_stream(port: int, body: dict[str, Any]) -> list[float]:
    """Arrival times of a stream's token events."""
    reader, writer = await open_connection(port)
    try:
        writer.write(build_request("POST", "/v1/completions", port, json_body({**body, "stream": True})))
        await writer.drain()
        status, headers = await read_head(reader)
        assert status == 200
        times = []
        async for event in iter_sse(reader, headers):
            if event == "[DONE]":
                break
            assert "error" not in event, event
            times.append(time.perf_counter())
        return times
    finally:
        writer.close()


def time_per_token(times: list[float]) -> float:
    """A stream's mean inter-token latency (events can arrive several to a read: gaps alone mislead)."""
    return (times[-1] - times[0]) / (len(times) - 1)


def kernel_send_queue(server_port: int, client_port: int) -> int:
    """Bytes the kernel holds in the server socket's send queue towards `client_port` (/proc/net/tcp)."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[0], 16)
    return 0


def test_a_stalled_client_does_not_slow_the_others(default_server: RunningServer) -> None:
    port = port_of(default_server.url)
    model = default_server.model
    others = [{"model": model, "prompt": f"other stream {i}", "max_tokens": OTHER_TOKENS, "temperature": 0,
               "ignore_eos": True} for i in range(OTHERS)]  # fmt: skip
    slow_body = {"model": model, **SLOW}

    async def baseline() -> list[float]:
        """The same load with the big request read as it comes: what "normal" is for the others."""
        eager = asyncio.ensure_future(timed_stream(port, slow_body))
        runs = await asyncio.gather(*(timed_stream(port, b) for b in others))
        await eager
        return [time_per_token(times) for times in runs]

    observed: dict[str, Any] = {}

    async def with_slow_client() -> tuple[list[float], dict[int, str]]:
        reader, writer = await open_connection(port, rcvbuf=4096)
        writer.write(build_request("POST", "/v1/completions", port, json_body({**slow_body, "stream": True})))
        await writer.drain()
        runs = asyncio.gather(*(timed_stream(port, b) for b in others))
        await asyncio.sleep(STALL_S)  # reads nothing meanwhile...
        observed["engine_idle_during_stall"] = await _wait_idle(port, 30.0)  # ...nor while the engine ends
        observed["kernel_queued"] = kernel_send_queue(port, writer.get_extra_info("sockname")[1])
        other_times = await runs
        status, headers = await read_head(reader)
        assert status == 200
        raw = b"".join([chunk async for chunk in iter_body(reader, headers)])
        writer.close()
        events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
        observed["events"], observed["bytes"] = len(events), len(raw)
        return [time_per_token(times) for times in other_times], stream_text(events)

    alone = asyncio.run(baseline())
    beside, slow_texts = asyncio.run(with_slow_client())

    # The others' inter-token latency stays normal with the stalled reader beside them.
    normal, stalled = statistics.mean(alone), statistics.mean(beside)
    print(f"\nothers' inter-token latency beside a reader keeping up {1000 * normal:.2f} ms, beside a "
          f"stalled reader {1000 * stalled:.2f} ms")  # fmt: skip
    assert stalled <= 3 * normal + 0.005, (normal, stalled)

    # The slow client, resumed, gets its whole output: the same text as without streaming.
    with default_server.client() as client:
        full = client.post("/v1/completions", json=slow_body).json()["choices"]
        assert slow_texts == {c["index"]: c["text"] for c in full}
        wait_idle(client)
    # The engine did not wait for the slow reader: its request was finished while nothing was read.
    assert observed["engine_idle_during_stall"], observed
    held = observed["bytes"] - observed["kernel_queued"] - 4096
    print(
        f"slow reader: {observed['events']} events ({observed['bytes'] / 1024:.0f} KiB) produced while it "
        f"read nothing; {observed['kernel_queued'] / 1024:.0f} KiB in the kernel's send queue, so about "
        f"{held / 1024:.0f} KiB waited in the server's memory"
    )


async def _wait_idle(port: int, timeout: float) -> bool:
    """Whether the engine runs and queues nothing (polling /stats for up to `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = (await request(port, "GET", "/stats")).json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
