"""Bootstrap the tiny teacher: build the tokenizer, train a small Llama on the task world, check it.

The teacher is what the embedded default compresses, so it must actually solve the tasks: training
fails loudly when held-out exact match is below ``min_heldout_exact_match``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from compress.config import BootstrapConfig
from compress.data.taskworld import END, make_splits
from compress.data.tokenizer import build_tokenizer
from compress.distill.trainer import Progress, encode_example, train_causal_lm
from compress.lineage import sha256_path, write_json
from compress.models import build_llama, count_params, load_model, load_tokenizer


@torch.no_grad()
def greedy_exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 16, batch_size: int = 128) -> float:
    """Fraction of rows whose greedy completion (up to the first newline) equals ``answer``."""
    model.eval()
    tokenizer.padding_side = "left"
    newline = tokenizer.convert_tokens_to_ids(END)
    hits = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=newline,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(t.split(END)[0] == r["answer"] for t, r in zip(texts, chunk, strict=True))
    return hits / max(1, len(rows))


def teacher_hash(cfg: BootstrapConfig) -> str:
    """Hash of what decides the teacher's weights (task world, shape, training), not where it is saved."""
    data = cfg.model_dump(mode="json", include={"taskworld", "arch", "train"})
    # Settings added to TrainConfig later whose default trains exactly as before: left out at their
    # default, so that a teacher trained before they existed keeps its hash.
    if data["train"].get("gradient_accumulation_steps") == 1:
        del data["train"]["gradient_accumulation_steps"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def bootstrap_teacher(cfg: BootstrapConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train the teacher described by ``cfg`` into ``cfg.out_dir``; return its manifest.

    The manifest (``teacher_manifest.json`` in the checkpoint) records the config hash, parameter
    count, held-out exact match and the checkpoint sha256.
    """
    t0 = time.time()
    out_dir = Path(cfg.out_dir)
    train_rows, heldout = make_splits(
        cfg.taskworld.tasks, cfg.taskworld.n_train, cfg.taskworld.n_heldout, cfg.taskworld.seed
    )
    tokenizer = build_tokenizer()
    model = build_llama(cfg.arch, tokenizer, seed=cfg.train.seed)
    examples = [
        encode_example(tokenizer, r["prompt"], tokenizer(r["answer"] + END, add_special_tokens=False)["input_ids"])
        for r in train_rows
    ]
    metrics = train_causal_lm(None, examples, out_dir, cfg.train, progress=progress, model=model, tokenizer=tokenizer)
    teacher = load_model(out_dir)
    em = greedy_exact_match(teacher, load_tokenizer(out_dir), heldout)
    manifest = {
        "config_hash": teacher_hash(cfg),
        "config": cfg.model_dump(mode="json"),
        "params": count_params(teacher),
        "heldout_exact_match": em,
        "train": metrics,
        "seconds": round(time.time() - t0, 1),
        "command": "distillflow bootstrap --config configs/bootstrap.yaml",
    }
    if em < cfg.min_heldout_exact_match:
        raise RuntimeError(
            f"teacher held-out exact match {em:.3f} is below min_heldout_exact_match={cfg.min_heldout_exact_match}"
        )
    manifest["sha256"] = sha256_path(out_dir)
    write_json(out_dir / "teacher_manifest.json", manifest)
    return manifest


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of a bootstrapped teacher, or None if there is none."""
    path = Path(out_dir) / "teacher_manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None
