"""Our distill stage against TRL's GKDTrainer: training speed and peak memory, same job, same run.

Both sides train the same student checkpoint against the same online teacher checkpoint on the same
tokenized examples, with the same loss, optimizer, schedule, batch and number of optimizer steps;
each runs in its own process, so that its peak RSS is its own:

- ``ours``: the real distill stage, ``compress.distill.recipe.distill_student`` with
  ``DistillConfig(loss="jsd", jsd_beta=0.5, kd_weight=1.0, temperature=1, teacher_source="online",
  save_steps=0)``, reading ``data/train.jsonl`` as the generate stage writes it;
- ``trl``: ``trl.experimental.gkd.GKDTrainer`` (TRL 1.x) with ``lmbda=0`` (no on-policy student
  generation: it trains on the fixed data, like ours), ``seq_kd=False``, ``beta=0.5``; its loss
  is the same generalized JSD at temperature 1 on the full vocabulary, with no CE term. TRL's newer
  ``DistillationTrainer`` is not used: it is on-policy only (the student always generates the
  completions), so it cannot train on fixed data. TRL gets a right-padding collator equivalent to
  ours (its default one wants chat messages) and ``gradient_checkpointing=False``, ``bf16=False``
  (TRL's config defaults turn both on; ours has neither on CPU).

The models are Llamas built here with random weights and one 32000-token vocabulary (a WordLevel
tokenizer from ``tokenizers``): teacher hidden 512 x 4 layers, student hidden 256 x 2 layers; the
teacher's lm_head is scaled up so that its next-token distributions are peaked and the loss is not
trivially zero. Data: ``steps x batch_size`` examples (exactly one epoch, so both sides train on
every example once, in the same order: same ``data_seed``), prompts of 32..64 random tokens and
completions of 128 random tokens (the loss is against the teacher's full distribution at every
completion position whatever the token, so the cost is that of teacher samples; sampling them with
``generate`` would take minutes on 2 cores). Loss only on completion tokens.

Measured, per side, inside ``Trainer.train`` (a callback added to every Trainer of the worker
process): training wall time (from train begin to train end, so model loading, our stage's head
check and saving are excluded; the first step, with its one-off costs, is included, and also
reported on its own), tokens/s = completion tokens trained on / that time (the same count on both
sides: every completion token of every example, once), peak RSS during training minus the RSS at
train begin (models and data loaded; the kernel's high-water mark is reset there) and the process's
absolute peak RSS, and the first and last logged loss (every step is logged up to 39 steps). The
two sides alternate ``--repeats`` times; the figures are the medians. Writes
``bench/results/kd_trainer.json`` with ``speed_ratio`` (ours over TRL, tokens/s) and
``memory_ratio`` (TRL's training peak over ours, both above the loaded baseline); target > 1 both.

TRL runs from a throwaway venv (its pins are not ours), outside the repository:

    python3 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install torch==2.13.0          # first: the CPU build, the same torch as ours
    /tmp/trl-venv/bin/pip install trl==1.16.0 transformers==5.19.0 torch==2.13.0

    .venv/bin/python bench/kd_trainer.py [--steps 8] [--batch-size 8] [--repeats 2] [--trl-python PY]
        [--completion-len 128] [--teacher-hidden 512] [--student-hidden 256] [--chunk-size N]

Without TRL in ``--trl-python`` the ``trl`` entry is null with the reason, and ours still runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRL_PYTHON = "/tmp/trl-venv/bin/python"
SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}
LOSS_AGREE_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------
# Memory and time, measured the same way on both sides (stdlib only: runs in either venv)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def install_meter() -> dict:
    """Add a callback to every ``transformers.Trainer`` made from now on; returns what it records."""
    import transformers.trainer as hf_trainer
    from transformers import TrainerCallback

    rec: dict = {"step_ends": [], "losses": []}

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["rss_loaded_mb"] = _status_mb("VmRSS")
            rec["peak_reset"] = _reset_peak()
            rec["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            rec["step_ends"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec["losses"].append((state.global_step, float(logs["loss"])))

        def on_train_end(self, args, state, control, **kw):
            rec["t1"] = time.perf_counter()
            rec["train_peak_mb"] = _status_mb("VmHWM")
            rec["steps"] = state.global_step

    hf_trainer.DEFAULT_CALLBACKS.append(Meter)
    return rec


def summarize(rec: dict, tokens: int, steps: int, extra: dict) -> dict:
    seconds = rec["t1"] - rec["t0"]
    ends = rec["step_ends"]
    first = ends[0] - rec["t0"] if ends else seconds
    rest = seconds - first
    peak_abs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train_peak = rec["train_peak_mb"] if rec.get("peak_reset") else peak_abs
    return {
        "steps": rec.get("steps"),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "first_step_s": round(first, 3),
        "step_seconds": [round(b - a, 2) for a, b in zip([rec["t0"], *ends], ends, strict=False)],
        "tokens_per_s_after_first_step": round(tokens * (steps - 1) / steps / rest, 1) if steps > 1 else None,
        "rss_loaded_mb": round(rec["rss_loaded_mb"], 1),
        "train_peak_rss_mb": round(train_peak, 1),
        "peak_rss_over_loaded_mb": round(train_peak - rec["rss_loaded_mb"], 1),
        "peak_rss_mb": round(peak_abs, 1),
        "first_loss": rec["losses"][0][1] if rec["losses"] else None,
        "last_loss": rec["losses"][-1][1] if rec["losses"] else None,
        "logged_steps": [s for s, _ in rec["losses"]],
        **extra,
    }


def _read_rows(work: Path) -> list[dict]:
    with (work / "data" / "train.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _log_every(steps: int) -> int:
    return max(1, steps // 20)  # what compress.distill.trainer.train_causal_lm logs at


# ---------------------------------------------------------------------------------------------
# The two workers (each its own process)


def worker_ours(work: Path, cfg: dict) -> dict:
    """The distill stage as the pipeline runs it: ``distill_student`` on the data directory."""
    from compress.config import DistillConfig, TrainConfig
    from compress.distill.recipe import distill_student
    from compress.jobs import Checkpoint, DistillJob

    rec = install_meter()
    dcfg = DistillConfig(
        loss="jsd",
        jsd_beta=0.5,
        kd_weight=1.0,
        temperature=1.0,
        teacher_source="online",
        teacher_dtype="float32",
        save_steps=0,
        sft_baseline=False,
        chunk_size=cfg["chunk_size"],
        train=TrainConfig(
            max_steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            learning_rate=cfg["lr"],
            warmup_ratio=cfg["warmup_ratio"],
            weight_decay=0.0,
            seed=0,
        ),
    )
    out = work / "out-ours"
    t0 = time.perf_counter()
    job = DistillJob(
        student=Checkpoint(path=work / "student", identity=None),
        data_dir=work / "data",
        logits_dir=None,
        data_sha=None,
        distill=dcfg,
        kd=True,
        teacher=Checkpoint(path=work / "teacher", identity=None),
        device="cpu",
        out_dir=out,
        log_path=work / "ours.jsonl",
    )
    metrics = distill_student(job)
    stage = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    extra = {"stage_seconds": round(stage, 3), "trainer_train_runtime": round(metrics["seconds"], 3)}
    return summarize(rec, cfg["tokens"], cfg["steps"], extra)


def worker_trl(work: Path, cfg: dict) -> dict:
    """TRL's GKDTrainer, off-policy (``lmbda=0``), on the same rows, models and settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rec = install_meter()
    t0 = time.perf_counter()
    rows = [r for r in _read_rows(work) if r["n_tokens"] > 0]
    ds = Dataset.from_dict(
        {
            "input_ids": [r["prompt_ids"] + r["token_ids"] for r in rows],
            "labels": [[-100] * len(r["prompt_ids"]) + r["token_ids"] for r in rows],
        }
    )
    tok = AutoTokenizer.from_pretrained(str(work / "student"))
    pad = tok.pad_token_id
    student = AutoModelForCausalLM.from_pretrained(str(work / "student"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher"), dtype=torch.float32).eval()
    teacher.requires_grad_(False)

    def collate(batch):  # right padding, as compress.distill.batches.make_collator does
        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[i, :n] = torch.tensor(ex["input_ids"])
            labels[i, :n] = torch.tensor(ex["labels"])
            attn[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    args = GKDConfig(
        output_dir=str(work / "out-trl"),
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=cfg["lr"],
        warmup_steps=math.ceil(cfg["warmup_ratio"] * cfg["steps"]),
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        logging_steps=_log_every(cfg["steps"]),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lmbda=0.0,
        seq_kd=False,
        beta=0.5,
        temperature=1.0,
    )
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ds, data_collator=collate, processing_class=tok
    )
    result = trainer.train()
    stage = time.perf_counter() - t0
    shutil.rmtree(work / "out-trl", ignore_errors=True)
    extra = {"stage_seconds": round(stage, 3), "trainer_train_runtime": round(result.metrics["train_runtime"], 3)}
    return summarize(rec, cfg["tokens"], cfg["steps"], extra)


# ---------------------------------------------------------------------------------------------
# Models and data (main process, our venv)


def build_tokenizer(vocab: int):
    """A WordLevel tokenizer of ``vocab`` ids: the four specials, then ``t4`` .. ``t{vocab-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIALS.values())}
    words |= {f"t{i}": i for i in range(len(words), vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def build_llama(tok, hidden: int, layers: int, max_len: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        max_position_embeddings=max_len,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def build_job(work: Path, args) -> dict:
    """Teacher and student checkpoints, and ``data/train.jsonl`` in the generate stage's layout."""
    import torch

    from compress.models import save_checkpoint

    tok = build_tokenizer(args.vocab)
    max_len = args.prompt_len + args.completion_len
    teacher = build_llama(tok, args.teacher_hidden, args.teacher_layers, max_len, seed=1).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(args.teacher_head_scale)  # peaked next-token distributions
    student = build_llama(tok, args.student_hidden, args.student_layers, max_len, seed=2)
    save_checkpoint(teacher, tok, work / "teacher")
    save_checkpoint(student, tok, work / "student")

    n = args.steps * args.batch_size  # one epoch exactly: both sides see every example once
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(len(SPECIALS), len(tok), (m,), generator=g).tolist() for m in lengths]
    # Random completion ids (module docstring: the loss does not depend on how they were drawn).
    completions = [
        torch.randint(len(SPECIALS), len(tok), (args.completion_len,), generator=g).tolist() for _ in lengths
    ]
    (work / "data").mkdir(parents=True, exist_ok=True)
    offset = 0
    with (work / "data" / "train.jsonl").open("w") as f:
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            row = {"id": i, "prompt": tok.decode(p), "prompt_ids": p, "completion": tok.decode(c),
                   "token_ids": c, "offset": offset, "n_tokens": len(c)}  # fmt: skip
            f.write(json.dumps(row) + "\n")
            offset += len(c)
    n_params = {m: sum(p.numel() for p in mod.parameters()) for m, mod in (("teacher", teacher), ("student", student))}
    return {
        "examples": n,
        "tokens": offset,
        "padded_tokens_per_step_max": args.batch_size * (args.prompt_len + args.completion_len),
        "params": n_params,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def run_worker(kind: str, python: str, work: Path, cfg: dict) -> dict:
    """One side in a fresh process; its result, or ``{"error": ...}``."""
    cmd = [python, __file__, "--worker", kind, "--workdir", str(work), "--job", json.dumps(cfg)]
    env = os.environ | WORKER_ENV
    if kind == "ours":
        env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(work))
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:] or [f"exit code {proc.returncode}"]
        print(f"{kind}: failed:\n  " + "\n  ".join(tail), flush=True)
        return {"error": tail[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"{kind}: {out['tokens_per_s']} tok/s ({out['seconds']} s, first step {out['first_step_s']} s), "
        f"peak RSS +{out['peak_rss_over_loaded_mb']} MB over loaded ({out['peak_rss_mb']} MB absolute), "
        f"loss {out['first_loss']:.6f} -> {out['last_loss']:.6f}",
        flush=True,
    )
    return out


def trl_versions(python: str) -> tuple[dict | None, str | None]:
    """TRL's venv's versions, or why it cannot be used."""
    if not Path(python).exists():
        return None, f"{python} does not exist (see this module's docstring to create the venv)"
    code = (
        "import json, torch, transformers, trl, accelerate\n"
        "from trl.experimental.gkd import GKDTrainer\n"
        "print(json.dumps({m.__name__: m.__version__ for m in (torch, transformers, trl, accelerate)}))"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=os.environ | WORKER_ENV)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return None, f"TRL does not import in {python}: {lines[-1] if lines else proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def median_of(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    out = {}
    for key, value in ok[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("steps", "tokens"):
            mid = statistics.median(r[key] for r in ok)
            out[key] = mid if "loss" in key else round(mid, 3)
        elif not isinstance(value, list):  # lists (per step) stay in the runs
            out[key] = value
    out["runs"] = runs
    return out


def loss_check(ours: dict | None, trl: dict | None) -> dict | None:
    if not ours or not trl or ours.get("first_loss") is None or trl.get("first_loss") is None:
        return None
    a, b = ours["first_loss"], trl["first_loss"]
    rel = abs(a - b) / max(abs(a), abs(b), 1e-12)
    out = {"ours": a, "trl": b, "rel_diff": float(f"{rel:.3g}"), "agree": rel <= LOSS_AGREE_RTOL}
    out["last_loss_rel_diff"] = float(
        f"{abs(ours['last_loss'] - trl['last_loss']) / max(abs(trl['last_loss']), 1e-12):.3g}"
    )
    out["note"] = (
        "the first logged loss is the mean over the first logging window (step 1 when steps < 40), the same "
        "batch on both sides (same data_seed, same dataset); both are the generalized JSD (beta 0.5, T 1) "
        "summed over completion tokens and divided by their count"
    )
    if not out["agree"]:
        out["note"] += f"; they differ by more than {LOSS_AGREE_RTOL} relative"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--teacher-hidden", type=int, default=512)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-head-scale", type=float, default=8.0, help="scales the teacher's lm_head weights")
    ap.add_argument("--student-hidden", type=int, default=256)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64, help="prompts have prompt_len/2 .. prompt_len tokens")
    ap.add_argument("--completion-len", type=int, default=128, help="completion tokens per example")
    ap.add_argument("--chunk-size", type=int, default=0, help="ours: distill.chunk_size (0: automatic, the default)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; medians are reported")
    ap.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="Python of the venv where TRL is installed")
    ap.add_argument("--workdir", type=Path, default=None, help="keep models and data here (default: a temp dir)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.job)
        fn = worker_ours if args.worker == "ours" else worker_trl
        print(json.dumps(fn(Path(args.workdir), job)))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    from compress.lineage import package_versions, write_json

    versions_trl, trl_reason = trl_versions(args.trl_python)
    print(f"TRL: {versions_trl or trl_reason}", flush=True)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kd_trainer-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data = build_job(work, args)
        print(f"models and {data['examples']} examples ({data['tokens']} completion tokens) built in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        cfg = {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_ratio": args.warmup_ratio,
            "tokens": data["tokens"],
            "chunk_size": args.chunk_size or None,
        }
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for _ in range(args.repeats):
            runs["ours"].append(run_worker("ours", sys.executable, work, cfg))
            if versions_trl is not None:
                runs["trl"].append(run_worker("trl", args.trl_python, work, cfg))
    finally:
        if tmp is not None:
            tmp.cleanup()

    ours, trl = median_of(runs["ours"]), median_of(runs["trl"])
    if versions_trl is not None and trl is None:
        trl_reason = f"TRL's run failed: {runs['trl'][-1]['error']}"
    both = ours is not None and trl is not None
    out = {
        "benchmark": "kd_trainer",
        "what": (
            "KD training, student vs online teacher, generalized JSD (beta 0.5, T 1, full vocabulary, no CE), "
            "fp32 on CPU: our distill stage (distill_student) against TRL's GKDTrainer (lmbda 0: off-policy, "
            "on the same fixed data), same student, teacher, examples, batch, steps, AdamW, lr and cosine schedule"
        ),
        "sizes": {
            "vocab": args.vocab,
            "teacher": {
                "hidden": args.teacher_hidden,
                "layers": args.teacher_layers,
                "params": data["params"]["teacher"],
            },
            "student": {
                "hidden": args.student_hidden,
                "layers": args.student_layers,
                "params": data["params"]["student"],
            },
            "steps": args.steps,
            "batch_size": args.batch_size,
            "prompt_tokens": [args.prompt_len // 2, args.prompt_len],
            "completion_tokens": args.completion_len,
            "chunk_size_ours": args.chunk_size or "automatic",
            "examples": data["examples"],
            "completion_tokens_total": data["tokens"],
        },
        "settings": {
            "loss": "generalized JSD, beta 0.5, temperature 1, teacher online (fp32), kd_weight 1 (no CE)",
            "optimizer": "transformers default (adamw_torch_fused), weight decay 0, max_grad_norm 1",
            "learning_rate": args.lr,
            "schedule": f"cosine, {math.ceil(args.warmup_ratio * args.steps)} warmup step(s)",
            "trl": "GKDTrainer(lmbda=0, seq_kd=False, beta=0.5, temperature=1, gradient_checkpointing=False, "
            "bf16=False), a right-padding collator like ours",
            "repeats": args.repeats,
            "timing": "train begin to train end (callback), tokens = completion tokens trained on",
            "memory": "peak RSS during training minus RSS at train begin (VmHWM reset there); absolute = ru_maxrss",
        },
        "ours": ours,
        "trl": trl,
        "trl_reason": trl_reason if trl is None else None,
        "speed_ratio": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3) if both else None,
        "speed_ratio_after_first_step": (
            round(ours["tokens_per_s_after_first_step"] / trl["tokens_per_s_after_first_step"], 3)
            if both and ours["tokens_per_s_after_first_step"]
            else None
        ),
        "speed_ratio_per_round": [
            round(a["tokens_per_s"] / b["tokens_per_s"], 3)
            for a, b in zip(runs["ours"], runs["trl"], strict=False)
            if "error" not in a and "error" not in b
        ],
        "memory_ratio": round(trl["peak_rss_over_loaded_mb"] / ours["peak_rss_over_loaded_mb"], 3) if both else None,
        "memory_ratio_absolute": round(trl["peak_rss_mb"] / ours["peak_rss_mb"], 3) if both else None,
        "first_step_loss": loss_check(ours, trl),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "packages": package_versions(),
        "packages_trl_venv": versions_trl,
    }
    write_json(ROOT / "bench" / "results" / "kd_trainer.json", out)
    if both:
        print(f"speed_ratio (ours/TRL tokens/s) {out['speed_ratio']}, memory_ratio (TRL/ours peak over loaded) "
              f"{out['memory_ratio']} (absolute {out['memory_ratio_absolute']}); first-step loss ours "
              f"{ours['first_loss']:.6f} TRL {trl['first_loss']:.6f}")  # fmt: skip
    else:
        print(f"ours: {ours and ours['tokens_per_s']} tok/s; TRL: {trl_reason}")


if __name__ == "__main__":
    main()
