"""The naive baseline: the same checkpoint in Hugging Face transformers behind a minimal FastAPI server.

What many people write first: `AutoModelForCausalLM.from_pretrained(dir)`, a manual token loop with
`past_key_values`, one OpenAI-style SSE chunk per token, and an `asyncio.Lock` so requests run one at a
time (no batching). `python -m bench.serve --compare-hf` starts it on a loopback port and runs the same
sweep against it as against our server. Only `/v1/completions` (streaming or not), `/v1/models` and `/health`.

    .venv/bin/python -m bench.hf_server --model weights/default --port 8001 --dtype float32 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict


class CompletionBody(BaseModel):
    """The fields the baseline honours; anything else a client sends is accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: int | None = None
    seed: int | None = None


class Generator:
    """Model, tokenizer and the token loop; every forward runs in a worker thread, never on the loop."""

    def __init__(self, model_dir: Path, dtype: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        eos = self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.max_len = int(self.model.config.max_position_embeddings)

    @torch.inference_mode()
    def forward(self, ids: list[int], past: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True)
        return out.logits[0, -1].float(), out.past_key_values

    @staticmethod
    def pick(logits: torch.Tensor, temperature: float, rng: torch.Generator) -> tuple[int, float]:
        logprobs = torch.log_softmax(logits, dim=-1)
        if temperature <= 0:
            token = int(torch.argmax(logits))
        else:
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=rng))
        return token, float(logprobs[token])


def create_app(gen: Generator, model_name: str) -> FastAPI:
    app = FastAPI(title="hf-baseline")
    lock = asyncio.Lock()  # one request at a time: the point of this baseline

    async def tokens(ids: list[int], body: CompletionBody) -> AsyncIterator[tuple[int, float, str | None]]:
        """(token, logprob, finish reason or None), generated while holding the lock."""
        rng = torch.Generator().manual_seed(body.seed if body.seed is not None else 0)
        async with lock:
            logits, past = await asyncio.to_thread(gen.forward, ids, None)
            for i in range(body.max_tokens):
                token, logprob = gen.pick(logits, body.temperature, rng)
                stop = not body.ignore_eos and token in gen.eos_ids
                finish = "length" if i + 1 == body.max_tokens else "stop" if stop else None
                yield token, logprob, finish
                if finish:
                    return
                logits, past = await asyncio.to_thread(gen.forward, [token], past)

    def chunk(
        cid: str, created: int, text: str, token: int, logprob: float, finish: str | None, want_logprobs: bool
    ) -> dict[str, Any]:
        logprobs = None
        if want_logprobs:
            logprobs = {"tokens": [gen.tokenizer.convert_ids_to_tokens(token)], "token_logprobs": [logprob]}
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "hf-baseline"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody) -> StreamingResponse | JSONResponse:
        ids = body.prompt if isinstance(body.prompt, list) else gen.tokenizer.encode(body.prompt)
        if not ids or body.max_tokens < 1 or len(ids) + body.max_tokens > gen.max_len:
            message = f"need a non-empty prompt and 1 <= prompt + max_tokens <= {gen.max_len}"
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, 400)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        want_logprobs = body.logprobs is not None

        async def events() -> AsyncIterator[tuple[str, int, float, str | None]]:
            out: list[int] = []
            sent = ""
            async for token, logprob, finish in tokens(ids, body):
                out.append(token)
                text = gen.tokenizer.decode(out, skip_special_tokens=True)
                delta = "" if text.endswith("\ufffd") and not finish else text[len(sent) :]
                sent += delta
                yield delta, token, logprob, finish

        if not body.stream:
            text, count, finish = "", 0, None
            async for delta, _, _, last in events():
                text, count, finish = text + delta, count + 1, last
            usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return JSONResponse(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model_name,
                    "choices": [choice],
                    "usage": usage,
                }
            )

        async def sse() -> AsyncIterator[bytes]:
            count = 0
            async for delta, token, logprob, finish in events():
                count += 1  # one chunk per token, even when its text is held back
                payload = chunk(cid, created, delta, token, logprob, finish, want_logprobs)
                yield b"data: " + json.dumps(payload).encode() + b"\n\n"
            if body.stream_options and body.stream_options.get("include_usage"):
                usage = {
                    "prompt_tokens": len(ids),
                    "completion_tokens": count,
                    "total_tokens": len(ids) + count,
                }
                payload = {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model_name,
                    "choices": [],
                    "usage": usage,
                }
                yield b"data: " + json.dumps(payload).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (HF layout)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--served-model-name", default=None, help="model id (default: the directory's name)")
    p.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback interface")
    args = p.parse_args(argv)
    if not args.allow_remote and not is_loopback(args.host):
        p.error(f"--host {args.host} is not a loopback address (pass --allow-remote to bind it anyway)")
    if args.threads:
        torch.set_num_threads(args.threads)
    import uvicorn

    app = create_app(Generator(args.model, args.dtype), args.served_model_name or args.model.resolve().name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
