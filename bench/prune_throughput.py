"""Serving speed of a pruned student against its teacher, both served by vLLM in the same run.

The teacher is a Llama built here with random weights (speed does not depend on what the weights
learned) and big enough that compute, not per-request overhead, sets the pace: hidden 1024, 8
layers, FFN 2816, 8 heads / 4 KV heads of 128 (``--hidden`` etc. change it; ``--teacher DIR`` uses
a checkpoint of yours instead). It is pruned to about half its parameters, depth and width together
(``prune.method: both``, ``target_ratio`` 0.5), by importance on task-world calibration texts. Each
model is served by the vLLM server from ``.venv-vllm`` and completes the same prompts greedily with
a fixed number of new tokens (``ignore_eos``); one warm-up request each. Writes
``bench/results/prune_throughput.json`` with tokens/s of both, ``ratio`` (student over teacher) and
``param_ratio``.

    .venv/bin/python bench/prune_throughput.py [--prompts 64] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT, add_model_args, build_random_llama, write_result

from compress.config import PruneConfig, TaskWorldConfig
from compress.data.taskworld import make_splits
from compress.models import checkpoint_params
from compress.prune.prune import prune_model, standalone_job
from compress.serving.vllm_server import ServerSpec, VLLMServer


async def _complete(client: httpx.AsyncClient, url: str, model: str, prompts: list[str], max_tokens: int) -> int:
    body = {"model": model, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    r = await client.post(url, json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def _serve_all(base_url: str, model: str, prompts: list[str], max_tokens: int, chunk: int, headers=None) -> int:
    url = f"{base_url}/v1/completions"
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        parts = [prompts[i : i + chunk] for i in range(0, len(prompts), chunk)]
        counts = await asyncio.gather(*(_complete(client, url, model, p, max_tokens) for p in parts))
    return sum(counts)


def throughput(model_dir: Path, prompts: list[str], max_tokens: int, log: Path) -> dict:
    """Tokens/s of ``model_dir`` served by vLLM: the prompts in 4 concurrent requests, after a warm-up."""
    vllm_python = ROOT / ".venv-vllm" / "bin" / "python"
    spec = ServerSpec(model_dir=model_dir, python=vllm_python, dtype="bfloat16", max_model_len=128)
    with VLLMServer(spec, log) as srv:
        asyncio.run(_serve_all(srv.base_url, srv.served_name, prompts[:4], max_tokens, 4, srv.headers))  # warm-up
        t0 = time.perf_counter()
        tokens = asyncio.run(
            _serve_all(srv.base_url, srv.served_name, prompts, max_tokens, len(prompts) // 4 or 1, srv.headers)
        )
        seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "--teacher")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    world = TaskWorldConfig()
    train, heldout = make_splits(world.tasks, 256, args.prompts, world.seed)
    prompts = [r["prompt"] for r in heldout]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = args.teacher or build_random_llama(tmp / "teacher", args)
        cfg = PruneConfig(method="both", target_ratio=args.ratio, calibration_seq_len=64)
        texts = [r["prompt"] + r["answer"] + "\n" for r in train]
        record = prune_model(standalone_job(teacher, texts, cfg, tmp / "student"), log=lambda m: print(m, flush=True))
        results = {}
        for name, path in (("teacher", teacher), ("student", tmp / "student")):
            results[name] = throughput(path, prompts, args.max_tokens, tmp / f"{name}-vllm.log")
            results[name]["params"] = checkpoint_params(path)
            print(f"{name}: {results[name]}", flush=True)
    ratio = results["student"]["tokens_per_s"] / results["teacher"]["tokens_per_s"]
    out = {
        "benchmark": "prune_throughput",
        "what": "vLLM greedy completions, fixed length, same prompts: pruned student over teacher",
        "teacher": {**results["teacher"], "shape": record["teacher_shape"]},
        "student": {**results["student"], "shape": record["student_shape"]},
        "ratio": round(ratio, 3),
        "param_ratio": round(results["student"]["params"] / results["teacher"]["params"], 3),
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
    }
    write_result("prune_throughput", out)
    print(f"student/teacher tokens/s: {ratio:.2f}x at {out['param_ratio']:.2f} of the parameters")


if __name__ == "__main__":
    main()
