"""Teacher generation like for like (vLLM vs transformers), the logit cache's size and its reader's memory.

Both paths are the generate stage's own code (``compress.generate``): the same teacher, the same
prompts, greedy, each capturing the top-20 log-probs of every generated token into the cache, in
the same run. The vLLM server runs in its own virtualenv (start-up reported apart, after a warm-up
batch); transformers runs in this process with batched ``generate``. The script checks that both
produced the same completions and the same top-k, and writes ``bench/results/generate.json``:

  ratio            vLLM tokens/s over transformers tokens/s (target >= 1.2 on CPU, >= 5 on a GPU)
  bytes_per_token  of the cache at k = 20, at the teacher's vocabulary and at a 128k one (target <= 100)
  reader_rss_mb    peak RSS of a process that reads every row of a >= 1M-token cache (target < 500),
                   against the earlier float32/int32 layout read the earlier way (all rows in memory)

    .venv/bin/python bench/generate.py                      # a built 8-layer, 1024-wide teacher (101M)
    .venv/bin/python bench/generate.py --teacher assets/teacher-tiny --prompts 4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.config import ArchConfig, GenerateConfig  # noqa: E402
from compress.data.taskworld import make_splits  # noqa: E402
from compress.data.tokenizer import build_tokenizer  # noqa: E402
from compress.generate.cache import CacheWriter, LogitCache  # noqa: E402
from compress.generate.generate import open_teacher, vocab_size  # noqa: E402
from compress.generate.run import Generator  # noqa: E402
from compress.generate.teacher import HFTeacher  # noqa: E402
from compress.jobs import Checkpoint  # noqa: E402
from compress.lineage import package_versions, write_json  # noqa: E402
from compress.models import build_llama, checkpoint_params, load_tokenizer, save_checkpoint  # noqa: E402


def build_teacher(out: Path, hidden: int, layers: int) -> Path:
    """A random Llama on the task world's tokenizer. Its output layer is scaled up so that greedy
    choices are well separated: random weights otherwise tie, and two correct implementations may
    then pick different tokens by rounding alone."""
    tok = build_tokenizer()
    arch = ArchConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 128), intermediate_size=3 * hidden,
                      max_position_embeddings=128)  # fmt: skip
    model = build_llama(arch, tok, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return save_checkpoint(model, tok, out)


@dataclass(frozen=True)
class Bench:
    """What both paths share: the teacher, its tokenizer and vocabulary, and the command line."""

    teacher: Path
    tok: Any
    vocab: int
    args: argparse.Namespace


def timed_run(teacher, rows, cfg, bench: Bench, tmp: Path, name: str) -> tuple[dict, float]:
    """One warm-up batch, then every row through the generate stage's code; (stats, seconds)."""
    Generator(rows[: cfg.prompts_per_request], cfg, teacher, bench.tok, tmp / f"warm-{name}").run(
        tmp / f"warm-d-{name}", tmp / f"warm-l-{name}", bench.vocab
    )
    t0 = time.perf_counter()
    stats = Generator(rows, cfg, teacher, bench.tok, tmp / f"work-{name}").run(
        tmp / f"d-{name}", tmp / f"l-{name}", bench.vocab
    )
    return stats, time.perf_counter() - t0


def both_paths(bench: Bench, rows, dtype: str, tmp: Path) -> dict:
    """The vLLM path, then the transformers path, over ``rows`` in ``dtype``: speeds and agreement."""
    args = bench.args
    cfg = GenerateConfig(top_k=20, max_tokens=args.max_tokens, prompts_per_request=args.batch,
                         concurrency=args.concurrency, dtype=dtype, server_threads=args.server_threads,
                         shard_size=max(args.batch * args.concurrency, 256))  # fmt: skip
    t0 = time.perf_counter()
    teacher = Checkpoint(path=bench.teacher, identity=None)
    with open_teacher(cfg, teacher, tmp / "vllm.log", log=lambda m: None) as served:
        startup = time.perf_counter() - t0
        vllm_stats, vllm_s = timed_run(served, rows, cfg, bench, tmp, "vllm")
    hf_stats, hf_s = timed_run(HFTeacher(bench.teacher, "cpu", dtype), rows, cfg, bench, tmp, "hf")
    return {"dtype": dtype, "prompts": len(rows), "startup": startup, "vllm": (vllm_stats, vllm_s),
            "hf": (hf_stats, hf_s), "agreement": compare(tmp)}  # fmt: skip


def compare(tmp: Path) -> dict:
    """Completions and top-k of the two paths: agreement, and the largest log-prob difference."""
    rows = {n: [json.loads(line) for line in (tmp / f"d-{n}" / "train.jsonl").open()] for n in ("vllm", "hf")}
    caches = {n: LogitCache(tmp / f"l-{n}") for n in ("vllm", "hf")}
    same, positions, ids_equal, max_diff = 0, 0, 0, 0.0
    for a, b in zip(rows["vllm"], rows["hf"], strict=True):
        if a["token_ids"] != b["token_ids"]:
            continue
        same += 1
        ta = caches["vllm"][a["offset"] : a["offset"] + a["n_tokens"]]
        tb = caches["hf"][b["offset"] : b["offset"] + b["n_tokens"]]
        positions += a["n_tokens"]
        ids_equal += int((ta["ids"] == tb["ids"]).all(-1).sum())
        # Log-probs of the ids both hold (near-ties may swap order between implementations).
        for t in range(a["n_tokens"]):
            _, ia, ib = np.intersect1d(ta["ids"][t], tb["ids"][t], return_indices=True)
            finite = np.isfinite(ta["logprobs"][t][ia]) & np.isfinite(tb["logprobs"][t][ib])
            if finite.any():
                d = np.abs(ta["logprobs"][t][ia] - tb["logprobs"][t][ib])[finite].max()
                max_diff = max(max_diff, float(d))
    return {
        "same_completions": same / len(rows["vllm"]),
        "same_topk_ids_per_token": ids_equal / positions if positions else None,
        "max_abs_logprob_diff": round(max_diff, 5),
    }


READER = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from compress.generate.cache import LogitCache
mode, path, n, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "ours":
    cache = LogitCache(path)            # checksums verified (a streamed read)
    total = 0.0
    for at in range(0, n, step):        # as the trainer does: one example's rows at a time
        rows = cache[at : at + step]
        total += float(rows["logprobs"][:, 0].sum())
else:
    ids = np.load(path + "/ids.npy", mmap_mode="r")
    lps = np.load(path + "/logprobs.npy", mmap_mode="r")
    kept = []                           # the earlier reader: every example's slice copied into memory
    for at in range(0, n, step):
        kept.append((np.array(ids[at : at + step]), np.array(lps[at : at + step])))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024)
"""


def reader_memory(tmp: Path, tokens: int, k: int = 20, vocab: int = 128256, step: int = 64) -> dict:
    """Peak RSS of reading every row of a ``tokens``-token cache, ours and the earlier layout."""
    rng = np.random.default_rng(0)
    ours, old = tmp / "rss-ours", tmp / "rss-old"
    writer = CacheWriter(ours, "topk", k, vocab)
    old.mkdir()
    ids_old = np.lib.format.open_memmap(old / "ids.npy", "w+", np.int32, (tokens, k))
    lps_old = np.lib.format.open_memmap(old / "logprobs.npy", "w+", np.float32, (tokens, k))
    chunk = 1 << 16
    for at in range(0, tokens, chunk):
        n = min(chunk, tokens - at)
        ids = rng.integers(0, vocab, (n, k))
        lps = np.sort(np.log(rng.dirichlet(np.ones(k * 4), n)[:, :k]), axis=1)[:, ::-1]
        writer.append(ids, lps)
        ids_old[at : at + n], lps_old[at : at + n] = ids, lps
    writer.close(rows=tokens // step)
    ids_old.flush(), lps_old.flush()
    del ids_old, lps_old
    script = READER.format(root=str(ROOT))
    out = {}
    for mode, path in (("ours", ours), ("earlier", old)):
        r = subprocess.run([sys.executable, "-c", script, mode, str(path), str(tokens), str(step)],
                           capture_output=True, text=True, check=True)  # fmt: skip
        out[mode] = round(float(r.stdout.split()[-1]), 1)
    cache = LogitCache(ours, verify=False)
    return {
        "tokens": tokens,
        "vocab": vocab,
        "reader_rss_mb": out["ours"],
        "earlier_reader_rss_mb": out["earlier"],
        "bytes_per_token_128k": round(cache.nbytes_per_token(), 1),
        "earlier_bytes_per_token": k * 8,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, help="a checkpoint (default: build one, see --hidden/--layers)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--agree-prompts", type=int, default=128, help="prompts of the float32 agreement run")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="prompts per request (and per HF generate call)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--server-threads", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", help="both paths compute in this dtype (the stage's default)")
    ap.add_argument("--cache-tokens", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generate.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        teacher = args.teacher or build_teacher(tmp / "teacher", args.hidden, args.layers)
        tok = load_tokenizer(teacher)
        vocab = vocab_size(teacher)
        rows, _ = make_splits(["rev", "sort", "max", "dup", "rot"], args.prompts, 10, seed=123)
        for r in rows:
            r["prompt_ids"] = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        bench = Bench(teacher, tok, vocab, args)
        speed = both_paths(bench, rows, args.dtype, tmp / "speed")
        # Two bf16 implementations round differently, and a different token early in a completion
        # changes everything after it: sameness is checked in float32, on the same model and prompts.
        exact = speed if args.dtype == "float32" else both_paths(
            bench, rows[: args.agree_prompts], "float32", tmp / "fp32"
        )  # fmt: skip
        memory = reader_memory(tmp, args.cache_tokens)
        params = checkpoint_params(teacher)

    (vllm_stats, vllm_s), (hf_stats, hf_s), startup = speed["vllm"], speed["hf"], speed["startup"]
    ours, base = vllm_stats["tokens"] / vllm_s, hf_stats["tokens"] / hf_s
    result = {
        "benchmark": "generate",
        "teacher": {
            "path": str(args.teacher) if args.teacher else f"built: {args.layers} layers x {args.hidden}",
            "params": params,
            "vocab": vocab,
            "dtype": args.dtype,
        },
        "prompts": args.prompts,
        "settings": {
            "max_tokens": args.max_tokens,
            "prompts_per_request": args.batch,
            "concurrency": args.concurrency,
            "server_threads": args.server_threads,
            "top_k": 20,
        },
        "ours": {
            "what": "vLLM server (own venv) + top-20 log-probs, generate stage code",
            "tokens": vllm_stats["tokens"],
            "seconds": round(vllm_s, 3),
            "tokens_per_s": round(ours, 1),
            "server_startup_s": round(startup, 1),
        },
        "baseline": {
            "what": "transformers generate (batched) + top-20 log-probs, generate stage code",
            "tokens": hf_stats["tokens"],
            "seconds": round(hf_s, 3),
            "tokens_per_s": round(base, 1),
        },
        "ratio": round(ours / base, 2),
        "ratio_target": "1.2 on CPU, 5 on a GPU",
        "agreement": {
            "float32": exact["agreement"] | {"prompts": exact["prompts"]},
            args.dtype: speed["agreement"] | {"prompts": speed["prompts"]},
        },
        "bytes_per_token": vllm_stats["cache"]["bytes_per_token"],
        "bytes_per_token_128k_vocab": memory["bytes_per_token_128k"],
        "bytes_per_token_target": 100,
        "reader": memory,
        "reader_rss_mb": memory["reader_rss_mb"],
        "reader_rss_target_mb": 500,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.is_available(),
            "peak_rss_mb_this_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        },
        "packages": package_versions(),
    }
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "teacher",
                    "ours",
                    "baseline",
                    "ratio",
                    "agreement",
                    "bytes_per_token",
                    "bytes_per_token_128k_vocab",
                    "reader_rss_mb",
                )
            },
            indent=1,
        )
    )
    print(
        f"ratio {result['ratio']}x  bytes/token {result['bytes_per_token']} (128k vocab: "
        f"{result['bytes_per_token_128k_vocab']})  reader RSS {result['reader_rss_mb']} MB "
        f"(earlier {memory['earlier_reader_rss_mb']} MB)"
    )
    write_json(args.out, result)


if __name__ == "__main__":
    main()
