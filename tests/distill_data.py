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


def make_distill_data(out: Path, n: int = 48, k: int = 8, max_new: int = 12, teacher_dir: Path = TEACHER) -> Path:
    """Write ``out/data`` and ``out/logits`` for ``n`` prompts; return ``out``."""
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
    np.save(out / "logits" / "ids.npy", np.concatenate(ids_all))
    np.save(out / "logits" / "logprobs.npy", np.concatenate(lps_all))
    write_json(out / "logits" / "meta.json", {"k": k, "rows": len(out_rows), "tokens": offset})
    return out
