"""vLLM serving throughput of a checkpoint: generated tokens per second under concurrent load.

Every prompt is its own request (as clients send them), ``throughput_concurrency`` in flight, each
generating exactly ``throughput_tokens`` tokens (``ignore_eos``), greedy. One warm-up request runs
first and is not counted. The figure is completion tokens reported by the server over wall time.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from compress.config import EvalServingConfig
    from compress.serving.vllm_server import VLLMServer

# Prompts for models evaluated on other tasks than the task world: short, plain, and varied so
# that the server's prefix cache does not turn the measurement into a cache benchmark.
GENERIC_PROMPTS = (
    "The history of the city begins",
    "In the morning the market opened and",
    "A short explanation of how rivers form:",
    "The recipe calls for flour, water and",
    "Once the committee had voted, the chair",
    "The main difference between the two designs is",
    "When the train left the station,",
    "Here is a list of things to pack for a trip:",
)


def throughput_prompts(tasks_dir: Path | None, n: int) -> list[str]:
    """``n`` prompts: the task world's held-out prompts when the run has them, else generic text."""
    pool: list[str] = []
    heldout = Path(tasks_dir) / "heldout.jsonl" if tasks_dir else None
    if heldout is not None and heldout.is_file():
        with heldout.open() as f:
            pool = [json.loads(line)["prompt"] for line, _ in zip(f, range(n), strict=False)]
    pool = pool or list(GENERIC_PROMPTS)
    return [pool[i % len(pool)] for i in range(n)]


def measure_throughput(
    server: VLLMServer, model_dir: Path, prompts: list[str], vllm: EvalServingConfig
) -> dict[str, Any]:
    """``{"tokens_per_s", "tokens", "requests", "seconds", "max_tokens", "concurrency"}`` of the
    running ``server`` of ``model_dir`` (its URL, name, context length and headers), as ``vllm`` says."""
    from transformers import AutoTokenizer

    longest = max(len(AutoTokenizer.from_pretrained(model_dir)(p)["input_ids"]) for p in prompts)
    max_tokens = min(vllm.throughput_tokens, server.max_model_len - longest)
    if max_tokens < 1:
        raise ValueError(
            f"evaluate.vllm.max_model_len: {server.max_model_len} leaves no room to generate after the prompts"
        )
    return asyncio.run(
        _measure(server.base_url, server.served_name, prompts, max_tokens, vllm.throughput_concurrency, server.headers)
    )


async def _measure(
    base_url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, headers: dict | None
) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, headers=headers) as client:

        async def one(prompt: str) -> int:
            async with gate:
                r = await client.post("/v1/completions", json=body | {"prompt": prompt})
                r.raise_for_status()
                return int(r.json()["usage"]["completion_tokens"])

        await one(prompts[0])  # warm-up, not counted
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
        seconds = time.perf_counter() - t0
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "tokens": tokens,
        "requests": len(prompts),
        "seconds": round(seconds, 3),
        "max_tokens": max_tokens,
        "concurrency": concurrency,
    }
