"""Bootstrap the tiny teacher: build the tokenizer, train a small Llama on the task world, check it.

The teacher is what the embedded default compresses, so it must actually solve the tasks: training
fails loudly when held-out exact match is below ``min_heldout_exact_match``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from compress.config import ArchConfig, BootstrapConfig
from compress.data.language import floor, language_of
from compress.data.taskworld import BOS, END, LANG, world_splits
from compress.data.tokenizer import build_tokenizer
from compress.distill.batches import encode_example
from compress.distill.trainer import Progress, TrainRun, train_causal_lm
from compress.lineage import sha256_path, write_json
from compress.models import build_llama, count_params, load_model, load_tokenizer, save_checkpoint


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


@torch.no_grad()
def text_nll(model, tokenizer, texts: list[str], batch_size: int = 64) -> float:
    """Mean NLL per character (nats) of ``texts``, each scored from the BOS token, as lm-eval's
    rolling log-likelihood scores a document (the first character conditioned on BOS)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        ids = [tokenizer(BOS + t, add_special_tokens=False)["input_ids"] for t in texts[i : i + batch_size]]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(x)
        for j, row in enumerate(ids):
            x[j, : len(row)], mask[j, : len(row)] = torch.tensor(row), 1
        logp = model(input_ids=x, attention_mask=mask).logits.float().log_softmax(-1)
        picked = logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0] * mask[:, 1:]
        total -= picked.sum().item()
        count += int(mask[:, 1:].sum())
    return total / max(1, count)


def per_task_exact_match(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """Greedy exact match of each task family of ``rows`` (``lang`` rows aside)."""
    tasks = sorted({r["task"] for r in rows if r["task"] != LANG})
    return {t: greedy_exact_match(model, tokenizer, [r for r in rows if r["task"] == t]) for t in tasks}


def _continue_from(cfg: BootstrapConfig):
    """The checkpoint of an earlier phase, checked against ``arch``: a second phase trains on."""
    model, tokenizer = load_model(cfg.init_from), load_tokenizer(cfg.init_from)
    for name, want in cfg.arch.model_dump().items():
        got = getattr(model.config, name, None)
        if got != want:
            raise ValueError(f"init_from '{cfg.init_from}': its {name} is {got}, arch.{name} is {want}")
    return model, tokenizer


def answer_examples(tokenizer, rows: list[dict]) -> list[dict[str, list[int]]]:
    """Task-world rows as training examples: the prompt, then the reference answer and its end marker."""
    return [
        encode_example(tokenizer, r["prompt"], tokenizer(r["answer"] + END, add_special_tokens=False)["input_ids"])
        for r in rows
    ]


def random_llama(arch: ArchConfig, out_dir: Path, seed: int = 0) -> Path:
    """A Llama of shape ``arch`` with random weights and the task world's tokenizer, saved to ``out_dir``.

    The untrained start of a teacher; on its own, a stand-in where what the weights learned does
    not matter (timings, shapes, plumbing: bench scripts and tests).
    """
    tokenizer = build_tokenizer()
    return save_checkpoint(build_llama(arch, tokenizer, seed=seed), tokenizer, out_dir)


def teacher_hash(cfg: BootstrapConfig) -> str:
    """Hash of what decides the teacher's weights (task world, shape, training, the checkpoint it
    starts from), not where it is saved."""
    data = cfg.model_dump(mode="json", include={"arch", "train"}) | {"taskworld": cfg.taskworld.hash_dump()}
    if cfg.init_from is not None:
        data["init_from"] = sha256_path(Path(cfg.init_from) / "model.safetensors")
    # Settings added to TrainConfig later whose default trains exactly as before: left out at their
    # default, so that a teacher trained before they existed keeps its hash.
    for name, default in (("gradient_accumulation_steps", 1), ("bf16", False), ("pack", False)):
        if data["train"].get(name) == default:
            del data["train"][name]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def bootstrap_teacher(
    cfg: BootstrapConfig, progress: Progress | None = None, command: str | None = None
) -> dict[str, Any]:
    """Train the teacher described by ``cfg`` into ``cfg.out_dir``; return its manifest.

    The manifest (``teacher_manifest.json`` in the checkpoint) records the config hash, parameter
    count, held-out exact match and the checkpoint sha256.
    """
    t0 = time.time()
    out_dir = Path(cfg.out_dir)
    train_rows, heldout = world_splits(cfg.taskworld)
    if cfg.init_from is not None:
        model, tokenizer = _continue_from(cfg)
    else:
        tokenizer = build_tokenizer()
        model = build_llama(cfg.arch, tokenizer, seed=cfg.train.seed)
    examples = answer_examples(tokenizer, train_rows)
    metrics = train_causal_lm(TrainRun(model, tokenizer, cfg.train), examples, out_dir, progress)
    teacher = load_model(out_dir)
    tok = load_tokenizer(out_dir)
    tasks = [r for r in heldout if r["task"] != LANG]
    by_task = per_task_exact_match(teacher, tok, tasks)
    # The overall score from the per-family ones (weighted by their rows): one generation pass, not two.
    counts = Counter(r["task"] for r in tasks)
    em = sum(by_task[t] * n for t, n in counts.items()) / len(tasks) if tasks else None
    manifest = {
        "config_hash": teacher_hash(cfg),
        "config": cfg.model_dump(mode="json"),
        "params": count_params(teacher),
        "heldout_exact_match": em,
        "heldout_exact_match_by_task": by_task,
        "train": metrics,
        "seconds": round(time.time() - t0, 1),
        "command": command,
    }
    texts = [r["answer"] + END for r in heldout if r["task"] == LANG]
    if texts:
        manifest["language"] = {"nll": text_nll(teacher, tok, texts)} | {
            f"floor_{k}": v for k, v in floor(language_of(cfg.taskworld), texts).items()
        }
    if em is not None and em < cfg.min_heldout_exact_match:
        # Kept for the post-mortem (per-task scores), under a name the cache check does not read.
        write_json(out_dir / "teacher_manifest.failed.json", manifest)
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
