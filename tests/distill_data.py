"""Distillation data made here with transformers, in the generate stage's layout (no vLLM needed).

Greedy completions of the task world's training prompts by the shipped tiny teacher, with the
teacher's top-k log-probs per completion token: ``data/train.jsonl`` and ``logits/{ids,logprobs}.npy``
plus ``logits/meta.json``, exactly what ``compress.distill.sources.load_cached_examples`` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compress.config import TaskWorldConfig
from compress.data.taskworld import make_splits, write_jsonl
from compress.lineage import write_json
from compress.models import load_model, load_tokenizer
from tests.conftest import ROOT

TEACHER = ROOT / "assets" / "teacher-tiny"


def make_distill_data(
    out: Path, n: int = 48, k: int = 8, max_new: int = 12, teacher_dir: Path = TEACHER, draws: int = 0
) -> Path:
    """Write ``out/data`` and ``out/logits`` for ``n`` prompts; return ``out``.

    ``draws`` > 0 makes a sampled cache instead of top-k ("Sparse Logit Sampling", proposal = p):
    per token, ``draws`` ids drawn from the teacher, stored as distinct ids with their counts
    (``counts.npy``) and log p; rows are padded to the most distinct ids of any token.
    """
    gen_torch = torch.Generator().manual_seed(0)
    model, tok = load_model(teacher_dir).eval(), load_tokenizer(teacher_dir)
    world = TaskWorldConfig()
    rows, _ = make_splits(world.tasks, n, 4, world.seed)
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    ids_all, lps_all, out_rows, offset = [], [], [], 0
    for i, r in enumerate(rows):
        p_ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([p_ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=newline,
                pad_token_id=tok.pad_token_id,
            )[0, len(p_ids) :].tolist()  # fmt: skip
            logits = model(torch.tensor([p_ids + gen])).logits[0].float()
        lp = torch.log_softmax(logits[len(p_ids) - 1 : -1], dim=-1)
        if draws:
            ids_all.append(torch.multinomial(lp.exp(), draws, replacement=True, generator=gen_torch))
            lps_all.append(lp)
        else:
            top = lp.topk(k, dim=-1)
            ids_all.append(top.indices.numpy().astype(np.int32))
            lps_all.append(top.values.numpy().astype(np.float32))
        out_rows.append(
            {"id": i, "task": r["task"], "prompt": r["prompt"], "answer": r["answer"], "prompt_ids": p_ids,
             "completion": tok.decode(gen), "token_ids": gen, "offset": offset, "n_tokens": len(gen)}
        )  # fmt: skip
        offset += len(gen)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "logits").mkdir(parents=True, exist_ok=True)
    write_jsonl(out_rows, out / "data" / "train.jsonl")
    if draws:
        _write_sampled(out / "logits", torch.cat(ids_all), torch.cat(lps_all))
        return out
    np.save(out / "logits" / "ids.npy", np.concatenate(ids_all))
    np.save(out / "logits" / "logprobs.npy", np.concatenate(lps_all))
    write_json(out / "logits" / "meta.json", {"k": k, "rows": len(out_rows), "tokens": offset})
    return out


def _write_sampled(logits: Path, drawn: torch.Tensor, lp: torch.Tensor) -> None:
    """Distinct drawn ids per token with their counts and log p, padded with count 0."""
    rows = [torch.unique(d, return_counts=True) for d in drawn]
    m = max(len(u) for u, _ in rows)
    ids = np.zeros((len(rows), m), dtype=np.int32)
    counts = np.zeros((len(rows), m), dtype=np.int32)
    lps = np.full((len(rows), m), -1e4, dtype=np.float32)
    for t, (u, c) in enumerate(rows):
        ids[t, : len(u)], counts[t, : len(u)] = u.numpy(), c.numpy()
        lps[t, : len(u)] = lp[t, u].numpy()
    np.save(logits / "ids.npy", ids)
    np.save(logits / "counts.npy", counts)
    np.save(logits / "logprobs.npy", lps)
    write_json(logits / "meta.json", {"k": m, "kind": "sampled", "draws": int(counts[0].sum()), "tokens": len(rows)})
