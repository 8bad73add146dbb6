"""Fidelity to the teacher: how closely a model follows the teacher along the teacher's own answers.

On held-out prompts (never trained on), the teacher answers greedily once; then, for any model,
at every answer position:

- ``kl``: KL(teacher || model) of the next-token distributions, in nats, over the full shared
  vocabulary (lower is better; 0 for the teacher itself);
- ``top1_agreement``: whether the model's most likely next token is the teacher's (its greedy
  token there), higher is better.

Both are means over all answer tokens; their stderr is that of the per-prompt means (tokens of
one answer are not independent). This is the "fidelity" of the distillation literature (e.g.
Stanton et al. 2021, "Does knowledge distillation really work?"), measured token by token as
DistillSpec measures draft/target agreement. lm-eval has no two-model metric, so it lives here;
it uses transformers on both models, in the run's device and in float32.

The teacher's greedy answers are kept in a JSONL file keyed by the teacher, the prompts and the
generation length, so the four evaluations of a run share one generation.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.jsonl import read_jsonl, write_jsonl

if TYPE_CHECKING:
    from compress.config import FidelityConfig
    from compress.jobs import Checkpoint, FidelityJob

TASK = "fidelity"


def answers_path(cache_dir: Path, teacher_id: str, prompts: list[list[int]], max_new_tokens: int) -> Path:
    """Where the teacher's greedy answers to ``prompts`` are kept."""
    h = hashlib.sha256(f"{teacher_id}\0{max_new_tokens}\0{json.dumps(prompts)}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"teacher-answers-{h}.jsonl"


def teacher_answers(
    teacher_dir: Path, prompts: list[list[int]], max_new_tokens: int, device: str = "cpu", batch_size: int = 8
) -> list[list[int]]:
    """The teacher's greedy answers (token ids, its end-of-turn / EOS included when reached)."""
    import torch

    from compress.models import load_model, load_tokenizer

    model = load_model(teacher_dir, torch.float32, device).eval()
    tok = load_tokenizer(teacher_dir)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos_ids), 0)
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
            )
        for row in gen[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
            out.append(row[:cut])
    return out


def cached_teacher_answers(
    job: FidelityJob, prompts: list[list[int]], max_new_tokens: int, device: str = "cpu"
) -> list[list[int]]:
    """``teacher_answers`` of ``job.teacher``, read from ``job.cache_dir`` when an earlier evaluation
    of the run made them."""
    path = answers_path(job.cache_dir, _teacher_key(job.teacher), prompts, max_new_tokens)
    if path.is_file():
        return [r["answer_ids"] for r in read_jsonl(path)]
    answers = teacher_answers(job.teacher.path, prompts, max_new_tokens, device)
    tmp = path.with_suffix(".tmp")
    write_jsonl([{"answer_ids": a} for a in answers], tmp)
    tmp.replace(path)  # atomic: a crash leaves no half-written cache
    return answers


def _teacher_key(teacher: Checkpoint) -> str:
    """What names the teacher in the answers' cache: its identity, or its resolved path while the
    identity is not known (a path names no weights, but it is all there is to tell teachers apart)."""
    return teacher.identity if teacher.identity is not None else str(Path(teacher.path).resolve())


def fidelity_scores(
    teacher_dir: Path,
    model_dir: Path,
    prompts: list[list[int]],
    answers: list[list[int]],
    device: str = "cpu",
    batch_size: int = 4,
) -> tuple[dict[str, dict[str, float | None]], int]:
    """``({"kl": {"value", "stderr"}, "top1_agreement": {...}}, answer tokens scored)``."""
    import torch

    from compress.models import load_model

    pairs = [(p, a) for p, a in zip(prompts, answers, strict=True) if a]
    if not pairs:
        raise ValueError("fidelity: the teacher gave no answer tokens to score")
    teacher = load_model(teacher_dir, torch.float32, device).eval()
    model = teacher if Path(model_dir).resolve() == Path(teacher_dir).resolve() else None
    model = model or load_model(model_dir, torch.float32, device).eval()
    # Rows past the tokenizer's vocabulary are padding in some checkpoints: compare the shared ones.
    vocab = min(teacher.get_output_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
    kl_per, agree_per, counts = [], [], []
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        seqs = [p + a for p, a in batch]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        with torch.no_grad():
            lt = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[..., :vocab].float(), -1)
            lm = lt if model is teacher else model(input_ids=ids, attention_mask=mask).logits[..., :vocab].float()
            lm = torch.log_softmax(lm, -1)
        for r, (p, a) in enumerate(batch):
            # Positions len(p)-1 .. len(p)+len(a)-2 predict the answer's tokens.
            sl = slice(len(p) - 1, len(p) + len(a) - 1)
            t, m = lt[r, sl], lm[r, sl]
            kl = (t.exp() * (t - m)).sum(-1).clamp_min(0)
            target = torch.tensor(a, device=device)
            kl_per.append(kl.sum().item())
            agree_per.append((m.argmax(-1) == target).sum().item())
            counts.append(len(a))
    n = sum(counts)
    return {
        "kl": {"value": sum(kl_per) / n, "stderr": _stderr([k / c for k, c in zip(kl_per, counts, strict=True)])},
        "top1_agreement": {
            "value": sum(agree_per) / n,
            "stderr": _stderr([g / c for g, c in zip(agree_per, counts, strict=True)]),
        },
    }, n


def _stderr(values: list[float]) -> float | None:
    """Standard error of the mean of per-prompt values (None for fewer than two)."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var / len(values))


def evaluate_fidelity(
    job: FidelityJob, model_dir: Path, fidelity: FidelityConfig, device: str = "cpu"
) -> dict[str, Any]:
    """Fidelity of ``model_dir`` to ``job.teacher`` on the first ``fidelity.prompts`` held-out prompts
    of ``job.prompts``, along the teacher's answers of ``fidelity.max_new_tokens`` tokens.

    Returns ``{"scores": {"fidelity": {...}}, "n": {"fidelity": prompts}, "tokens": answer tokens scored}``.
    """
    rows = read_jsonl(Path(job.prompts))[: fidelity.prompts]
    if not rows:
        raise ValueError(f"{job.prompts}: no held-out prompts for the fidelity measurement")
    prompts = [list(r["prompt_ids"]) for r in rows]
    answers = cached_teacher_answers(job, prompts, fidelity.max_new_tokens, device)
    scores, tokens = fidelity_scores(job.teacher.path, model_dir, prompts, answers, device)
    return {"scores": {TASK: scores}, "n": {TASK: len(rows)}, "tokens": tokens}
