"""The distill stage's library entry: train the student on the generated data, by KD or by SFT only.

``distill_student(job, progress)`` takes the stage's whole ``DistillJob`` (``compress.jobs``).
Features:
  * KD (``job.kd``): ``kd_weight * KD + (1 - kd_weight) * CE`` against the generate stage's cached
    top-k or sampled teacher rows (``job.logits_dir``), or, with ``distill.teacher_source:
    online``, against the teacher checkpoint (``job.teacher``) loaded in the same process (its
    dtype from ``distill.teacher_dtype``); its tokenizer must be the student's;
  * the hidden-state loss (``distill.hidden_weight``) pairing each student layer with the teacher
    layer it came from (``job.teacher_layers``, the pruned student's kept layers);
  * the SFT baseline without ``job.kd``: CE on the teacher's completions;
  * the trainer's features (``compress.distill.trainer``): chunked loss, packing, LoRA, checkpoints
    and resume after a crash, the live loss log (``job.log_path``);
  * several processes with ``distill.num_processes`` > 1, under torchrun (``python -m
    torch.distributed.run``): each process runs ``compress.distill.worker`` on the same job file,
    Trainer's DDP splits the global batch (gloo on CPU, nccl on GPU), process 0 saves the student
    and writes the metrics. Progress comes from the loss log the run appends to.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.jobs import DistillJob
from compress.lineage import read_json, write_json

if TYPE_CHECKING:  # the names only: this module imports no torch until a job runs
    from compress.distill.callbacks import Progress
    from compress.distill.kd_trainer import Objective


def distill_student(job: DistillJob, progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune ``job.student`` on ``job.data_dir`` into ``job.out_dir`` (a plain HF checkpoint).

    With ``job.kd`` the loss is ``kd_weight * KD + (1 - kd_weight) * CE`` against the cached
    teacher rows in ``job.logits_dir`` or, with ``distill.teacher_source: online``, the model
    ``job.teacher``; without, it is CE on the teacher's completions (the SFT baseline).
    ``job.teacher_layers`` (the pruned student's kept layers, 0-based) pairs each student layer with
    the teacher layer it came from in the hidden-state loss. ``job.log_path`` receives the loss
    curve as JSON lines. A crashed run resumes from its last checkpoint when called again with the
    same job (``distill.save_steps``). Returns the training metrics with the run's facts (parameters,
    examples, loss, processes).
    """
    if job.distill.num_processes == 1:
        return run_job(job, progress)
    return run_torchrun(job, progress)


def teacher_dtype(name: str, device: str):
    """The online teacher's dtype: bf16 where the GPU supports it (auto), else what was asked."""
    import torch

    if name == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def run_job(job: DistillJob, progress: Progress | None = None) -> dict[str, Any]:
    """Train one student in this process (one rank of a torchrun job, or the only process)."""
    from compress.distill.teacher_signal import load_cached_examples
    from compress.distill.trainer import TrainRun, train_causal_lm
    from compress.models import count_params, load_model, load_tokenizer

    distill, student = job.distill, job.student
    online = job.kd and distill.teacher_source == "online"
    tokenizer = load_tokenizer(student.path, student.trust_remote_code)
    examples = load_cached_examples(job.data_dir, job.logits_dir, tokenizer, with_teacher=job.kd and not online)
    if not examples:
        raise ValueError(f"{job.data_dir}/train.jsonl has no usable rows (every completion is empty)")
    device = _process_device(job.device)
    model = load_model(student.path, device=device, trust_remote_code=student.trust_remote_code)
    run = TrainRun(
        model=model,
        tokenizer=tokenizer,
        train=distill.train,
        objective=_objective(job),
        teacher=_online_teacher(job, model, tokenizer, device) if online else None,
        top_k=examples.k,
        lora=distill.lora,
        save_steps=distill.save_steps,
        num_processes=distill.num_processes,
        device=device,
        log_path=job.log_path,
        init_dir=student.path,
    )
    params = count_params(model)
    metrics = train_causal_lm(run, examples, job.out_dir, progress)
    return metrics | {
        "params": params,
        "examples": len(examples),
        "kd": job.kd,
        "loss": distill.loss if job.kd else "ce",
        "teacher_source": distill.teacher_source if job.kd else None,
        "processes": distill.num_processes,
        "lora": distill.lora is not None,
    }


def _process_device(device: str) -> str:
    """This process's device: under torchrun each process takes the GPU of its local rank."""
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def _online_teacher(job: DistillJob, student, tokenizer, device: str):
    """The teacher model, frozen in eval mode on ``device``; its tokenizer checked against the student's."""
    from compress.distill.heads import shared_vocab
    from compress.models import load_model, load_tokenizer

    if job.teacher is None:
        raise ValueError("distill.teacher_source: online needs the teacher checkpoint (job.teacher)")
    path, trust = job.teacher.path, job.teacher.trust_remote_code
    teacher = load_model(path, teacher_dtype(job.distill.teacher_dtype, device), device, trust).eval()
    teacher.requires_grad_(False)
    shared_vocab(student, teacher, tokenizer, load_tokenizer(path, trust))
    return teacher


def _objective(job: DistillJob) -> Objective:
    """What the student is trained against: KD + CE (+ hidden MSE) with ``job.kd``, else CE only."""
    from compress.distill.kd_trainer import Objective
    from compress.distill.losses import LossSpec

    d = job.distill
    layer_map = tuple(job.teacher_layers) if job.kd and d.hidden_weight and job.teacher_layers else None
    return Objective(
        kd_weight=d.kd_weight if job.kd else 0.0,
        spec=LossSpec(d.loss, d.temperature, d.skew_alpha, d.jsd_beta),
        tail=d.tail,
        hidden_weight=d.hidden_weight if job.kd else 0.0,
        chunk_size=d.chunk_size,
        hidden_layer_map=layer_map,
    )


def run_torchrun(job: DistillJob, progress: Progress | None = None, poll_s: float = 2.0) -> dict[str, Any]:
    """Run the job on ``distill.num_processes`` processes with torchrun; return process 0's metrics."""
    from compress.serving.vllm_server import stop_group

    out = Path(job.out_dir)
    work = out.with_name(out.name + ".job")
    work.mkdir(parents=True, exist_ok=True)
    job_file, result_file = work / "job.json", work / "result.json"
    result_file.unlink(missing_ok=True)
    write_json(job_file, job.model_dump(mode="json"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={job.distill.num_processes}", "-m", "compress.distill.worker", str(job_file),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // job.distill.num_processes))}
    log = (work / "torchrun.log").open("w")
    # Its own session: stopping the stage (cancellation, a signal) stops every rank with it.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    seen = 0
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            seen = _report_log(job.log_path, job.distill.train.max_steps, seen, progress)
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
            f"distill under torchrun ({job.distill.num_processes} processes) failed with exit code "
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
