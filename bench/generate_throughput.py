"""Teacher generation throughput: the vLLM server path (ours) vs batched HF ``generate`` (baseline).

Both complete the same task-world prompts greedily with the same teacher, measured in the same run,
and the script prints tokens/s for each and the ratio. The vLLM figure includes capturing the top-k
log-probs (what the generate stage really does); the HF baseline captures nothing, so the ratio is
conservative. Results go to ``bench/results/generate_throughput.json``.

    .venv/bin/python bench/generate_throughput.py [--teacher assets/teacher-tiny] [--prompts 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from compress.config import GenerateConfig
from compress.data.generate import generate_with_logprobs
from compress.data.taskworld import END, make_splits
from compress.lineage import package_versions, write_json
from compress.models import load_model, load_tokenizer
from compress.serving.vllm_server import VLLMServer

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def hf_generate(teacher: Path, prompts: list[str], batch_size: int, max_tokens: int) -> tuple[int, float]:
    model, tok = load_model(teacher), load_tokenizer(teacher)
    model.eval()
    tok.padding_side = "left"
    newline = tok.convert_tokens_to_ids(END)
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, eos_token_id=newline,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        new = out[:, enc["input_ids"].shape[1] :]
        # Count tokens up to and including the first newline, as the server does.
        for row in new.tolist():
            tokens += row.index(newline) + 1 if newline in row else len(row)
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=ROOT / "assets" / "teacher-tiny")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rows, _ = make_splits(["rev", "sort", "max", "dup", "rot"], args.prompts, 10, seed=123)
    cfg = GenerateConfig(top_k=20, max_tokens=args.max_tokens, prompts_per_request=args.batch_size, concurrency=4)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        server = VLLMServer(args.teacher, python=args.vllm_python, log_path=tmp / "vllm.log", max_model_len=128)
        with server:
            # One warm-up batch so start-up compilation does not count.
            generate_with_logprobs(server.base_url, "teacher", rows[:64], cfg, tmp / "w", tmp / "wl")
            t0 = time.perf_counter()
            stats = generate_with_logprobs(server.base_url, "teacher", rows, cfg, tmp / "d", tmp / "l")
            vllm_s = time.perf_counter() - t0
    hf_tokens, hf_s = hf_generate(args.teacher, [r["prompt"] for r in rows], args.batch_size, args.max_tokens)

    ours = stats["tokens"] / vllm_s
    base = hf_tokens / hf_s
    result = {
        "benchmark": "generate_throughput",
        "prompts": args.prompts,
        "ours": {"what": "vLLM server + top-20 logprobs", "tokens": stats["tokens"], "seconds": round(vllm_s, 3),
                 "tokens_per_s": round(ours, 1)},
        "baseline": {"what": "HF generate, batched, no logprobs", "tokens": hf_tokens, "seconds": round(hf_s, 3),
                     "tokens_per_s": round(base, 1)},
        "ratio": round(ours / base, 3),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "packages": package_versions(),
    }  # fmt: skip
    write_json(ROOT / "bench" / "results" / "generate_throughput.json", result)
    print(f"vLLM server: {ours:,.0f} tokens/s   HF generate: {base:,.0f} tokens/s   ratio: {ours / base:.2f}x")


if __name__ == "__main__":
    main()
