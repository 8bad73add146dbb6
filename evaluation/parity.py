"""Greedy parity: does a checkpoint generate the same tokens in vLLM as in transformers?

Every stage hands checkpoints to both engines (the teacher is served by vLLM for data and scored by
transformers in training; the pruned student is evaluated in both), so a converted or pruned
checkpoint that one of them reads differently would corrupt the run silently. This check serves
the checkpoint with our vLLM server and compares its greedy token ids with transformers' on the
same token-id prompts, prompt by prompt: the share that match exactly, and for the others the
first position where they part. At float32 both engines should agree except where two tokens are
nearly tied (then a last-bit difference in a matmul picks the other one); at bfloat16 vLLM rounds
weights and activations, so some answers part after a few tokens: run both to see the difference.

  python -m evaluation.parity MODEL_DIR [MODEL_DIR ...] --prompts runs/x/data/heldout_prompts.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from compress.jsonl import read_jsonl
from compress.lineage import write_json


def vllm_greedy(
    model_dir: Path, prompts: list[list[int]], max_tokens: int, dtype: str, vllm_python: Path, log_path: Path
) -> list[list[int]]:
    """Greedy token ids from our vLLM server (stopping at the model's EOS, as transformers does)."""
    from compress.generate.teacher import HTTPTeacher, Sampling
    from compress.serving.vllm_server import ServerSpec, VLLMServer

    longest = max(len(p) for p in prompts) + max_tokens
    spec = ServerSpec(model_dir=model_dir, python=vllm_python, dtype=dtype, max_model_len=max(longest, 256))
    with VLLMServer(spec, log_path) as server:
        teacher = HTTPTeacher(server.base_url, server.served_name, server.api_key, concurrency=4)
        done = asyncio.run(teacher.complete(prompts, Sampling(max_tokens=max_tokens), 0))
    return [c.ids for c in done]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_parity(
    model_dir: Path,
    prompts: list[list[int]],
    max_tokens: int = 64,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    vllm_python: Path = Path(".venv-vllm/bin/python"),
    work: Path = Path("runs/parity"),
) -> dict[str, Any]:
    """Per dtype: prompts compared, exact matches, the match rate and where mismatches begin."""
    from evaluation.fidelity import teacher_answers

    t0 = time.time()
    hf = teacher_answers(Path(model_dir), prompts, max_tokens)
    out: dict[str, Any] = {"model": str(model_dir), "prompts": len(prompts), "max_tokens": max_tokens}
    for dtype in dtypes:
        served = vllm_greedy(model_dir, prompts, max_tokens, dtype, vllm_python, work / f"vllm-{dtype}.log")
        diffs = [first_difference(a, b) for a, b in zip(hf, served, strict=True)]
        parted = [d for d in diffs if d is not None]
        out[dtype] = {
            "matches": len(prompts) - len(parted),
            "match_rate": (len(prompts) - len(parted)) / len(prompts),
            "first_difference_at": parted,
        }
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="Checkpoint directories.")
    ap.add_argument(
        "--prompts", type=Path, required=True, help="JSONL with prompt_ids (e.g. data/heldout_prompts.jsonl)."
    )
    ap.add_argument("--n", type=int, default=24, help="Prompts compared (the first N).")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vllm-python", type=Path, default=Path(".venv-vllm/bin/python"))
    ap.add_argument("--out", type=Path, default=Path("runs/parity.json"), help="Where the figures go (JSON).")
    ap.add_argument("--logs", type=Path, default=Path("runs/parity-logs"), help="The vLLM servers' logs.")
    args = ap.parse_args()
    prompts = [list(r["prompt_ids"]) for r in read_jsonl(args.prompts)[: args.n]]
    results = [
        greedy_parity(m, prompts, args.max_tokens, vllm_python=args.vllm_python, work=args.logs) for m in args.models
    ]
    write_json(args.out, {"prompts_file": str(args.prompts), "results": results})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
