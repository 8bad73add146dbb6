"""The distill stage: train the pruned student on the generated data, by KD or by SFT only.

``distill_student`` runs the training in this process, or, with ``distill.num_processes`` > 1,
under torchrun (``python -m torch.distributed.run``): each process runs ``compress.distill.worker``
on the same job file, Trainer's DDP splits the global batch (gloo on CPU, nccl on GPU), process 0
saves the student and writes the metrics. Progress comes from the loss log the run appends to.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from compress.config import DistillConfig
from compress.lineage import read_json, write_json

Progress = Any  # Callable[[float, str], None]; kept loose so this module imports no torch


class DistillJob(BaseModel):
    """Everything one distill run needs, as the JSON handed to each training process."""

    model_config = ConfigDict(extra="forbid")

    student_dir: Path
    data_dir: Path
    logits_dir: Path | None
    cfg: DistillConfig
    out_dir: Path
    use_teacher_logits: bool = True
    teacher_dir: Path | None = None
    device: str = "cpu"
    log_path: Path | None = None
    trust_remote_code: bool = False
    teacher_layers: list[int] | None = None  # the teacher layer each student layer came from (pruning)


def teacher_dtype(name: str, device: str):
    """The online teacher's dtype: bf16 where the GPU supports it (auto), else what was asked."""
    import torch

    if name == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def run_job(job: DistillJob, progress: Progress | None = None) -> dict[str, Any]:
    """Train one student in this process (one rank of a torchrun job, or the only process)."""
    from compress.distill.losses import LossSpec
    from compress.distill.teacher_signal import load_cached_examples
    from compress.distill.trainer import Objective, shared_vocab, train_causal_lm
    from compress.models import count_params, load_model, load_tokenizer

    cfg = job.cfg
    kd = job.use_teacher_logits
    online = kd and cfg.teacher_source == "online"
    tokenizer = load_tokenizer(job.student_dir, job.trust_remote_code)
    examples = load_cached_examples(job.data_dir, job.logits_dir, tokenizer, with_teacher=kd and not online)
    if not examples:
        raise ValueError(f"{job.data_dir}/train.jsonl has no usable rows (every completion is empty)")
    k = examples.k
    device = job.device
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model = load_model(job.student_dir, device=device, trust_remote_code=job.trust_remote_code)
    teacher = None
    if online:
        if job.teacher_dir is None:
            raise ValueError("distill.teacher_source: online needs the teacher checkpoint")
        teacher = load_model(
            job.teacher_dir, teacher_dtype(cfg.teacher_dtype, device), device, job.trust_remote_code
        ).eval()
        teacher.requires_grad_(False)
        shared_vocab(model, teacher, tokenizer, load_tokenizer(job.teacher_dir, job.trust_remote_code))
    objective = Objective(
        kd_weight=cfg.kd_weight if kd else 0.0,
        spec=LossSpec(cfg.loss, cfg.temperature, cfg.skew_alpha, cfg.jsd_beta),
        tail=cfg.tail,
        hidden_weight=cfg.hidden_weight if kd else 0.0,
        chunk_size=cfg.chunk_size,
        hidden_layer_map=tuple(job.teacher_layers) if kd and cfg.hidden_weight and job.teacher_layers else None,
    )
    params = count_params(model)
    metrics = train_causal_lm(
        job.student_dir,
        examples,
        job.out_dir,
        cfg.train,
        objective=objective,
        top_k=k,
        progress=progress,
        model=model,
        tokenizer=tokenizer,
        device=device,
        log_path=job.log_path,
        teacher_model=teacher,
        lora=cfg.lora,
        save_steps=cfg.save_steps,
        num_processes=cfg.num_processes,
    )
    return metrics | {
        "params": params,
        "examples": len(examples),
        "kd": kd,
        "loss": cfg.loss if kd else "ce",
        "teacher_source": cfg.teacher_source if kd else None,
        "processes": cfg.num_processes,
        "lora": cfg.lora is not None,
    }


def distill_student(
    student_dir: Path,
    data_dir: Path,
    logits_dir: Path | None,
    cfg: DistillConfig,
    out_dir: Path,
    use_teacher_logits: bool = True,
    progress: Progress | None = None,
    device: str = "cpu",
    log_path: Path | None = None,
    teacher_dir: Path | None = None,
    trust_remote_code: bool = False,
    teacher_layers: list[int] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``student_dir`` on ``data_dir`` into ``out_dir`` (a plain HF checkpoint).

    With ``use_teacher_logits`` the loss is ``kd_weight * KD + (1 - kd_weight) * CE`` against the
    cached top-k in ``logits_dir`` or, with ``cfg.teacher_source: online``, the model at
    ``teacher_dir``; without, it is CE on the teacher's completions (the SFT baseline).
    ``teacher_layers`` (the pruned student's kept layers, 0-based) pairs each student layer with the
    teacher layer it came from in the hidden-state loss. ``log_path`` receives the loss curve as JSON
    lines. A crashed run resumes from its last checkpoint when called again with the same inputs
    (``cfg.save_steps``).
    """
    job = DistillJob(
        student_dir=student_dir,
        data_dir=data_dir,
        logits_dir=logits_dir,
        cfg=cfg,
        out_dir=out_dir,
        use_teacher_logits=use_teacher_logits,
        teacher_dir=teacher_dir,
        device=device,
        log_path=log_path,
        trust_remote_code=trust_remote_code,
        teacher_layers=teacher_layers,
    )
    if cfg.num_processes == 1:
        return run_job(job, progress)
    return run_torchrun(job, progress)


def run_torchrun(job: DistillJob, progress: Progress | None = None, poll_s: float = 2.0) -> dict[str, Any]:
    """Run the job on ``cfg.num_processes`` processes with torchrun; return process 0's metrics."""
    from compress.serving.vllm_server import stop_group

    out = Path(job.out_dir)
    work = out.with_name(out.name + ".job")
    work.mkdir(parents=True, exist_ok=True)
    job_file, result_file = work / "job.json", work / "result.json"
    result_file.unlink(missing_ok=True)
    write_json(job_file, job.model_dump(mode="json"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={job.cfg.num_processes}", "-m", "compress.distill.worker", str(job_file),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // job.cfg.num_processes))}
    log = (work / "torchrun.log").open("w")
    # Its own session: stopping the stage (cancellation, a signal) stops every rank with it.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    seen = 0
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            seen = _report_log(job.log_path, job.cfg.train.max_steps, seen, progress)
    except BaseException:
        stop_group(proc, grace_s=10.0)
        raise
    finally:
        log.close()
    if proc.returncode != 0:
        lines = (work / "torchrun.log").read_text(errors="replace").strip().splitlines()
        # The ranks' own exceptions say why; torchrun's summary after them does not.
        tail = [x for x in lines if "Error" in x and "ChildFailedError" not in x][:5] or lines[-15:]
        raise RuntimeError(
            f"distill under torchrun ({job.cfg.num_processes} processes) failed with exit code "
            f"{proc.returncode}; log {work / 'torchrun.log'}:\n" + "\n".join(tail)
        )
    return read_json(result_file)


def _report_log(log_path: Path | None, max_steps: int, seen: int, progress: Progress | None) -> int:
    """Forward new lines of the live loss log to ``progress``; return how many lines were read."""
    if progress is None or log_path is None or not Path(log_path).is_file():
        return seen
    import json

    lines = Path(log_path).read_text().splitlines()
    for line in lines[seen:]:
        try:
            row = json.loads(line)
        except ValueError:
            break  # a line being written
        step = row.get("step", 0)
        progress(step / max(1, max_steps), f"step {step}/{max_steps} loss {row.get('loss', float('nan')):.4f}")
        seen += 1
    return seen
