"""What orchestration costs: the demo through Prefect against the same stage functions called directly.

In one run, on the demo config (``configs/tiny.yaml``), each a fresh process and a fresh run
directory, timed from process start to exit:
  baseline  the library functions called in order from plain Python (prepare, prune, generate with
            a vLLM server, KD and SFT training, four lm-eval runs): no Prefect, no cache, no manifest;
  ours      ``distillflow run`` (preflight, ephemeral Prefect server, tasks, artifacts, content
            cache, manifest, report);
  rerun     ``distillflow run`` again, every stage a cache hit: what a user waits for when nothing
            changed.
The Prefect home is warmed first (its database created by one trivial flow), as it is on every
run after a user's first; that one-time cost is reported as ``first_use_s``.
Writes ``bench/results/overhead.json`` with ``overhead_pct`` (target < 5) and ``cached_rerun_s``
(target < 15).

With ``--repeats N`` the direct and flow runs alternate N times and the medians are compared (on
two cores, the same command varies by a few percent from run to run).

    .venv/bin/python bench/overhead.py [--config configs/tiny.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def direct(cfg, run_dir: Path) -> float:
    """The stages' library functions in order, without Prefect; returns the wall time."""
    from compress.data.prepare import prepare_data
    from compress.data.prepare import standalone_job as prepare_job
    from compress.distill.recipe import distill_student
    from compress.generate.generate import generate_data
    from compress.hub import read_model_config
    from compress.jobs import Checkpoint, DistillJob, GenerateJob, PruneJob
    from compress.models import resolve_device
    from compress.prune.prune import prune_model
    from evaluation.harness import evaluate_checkpoint, standalone_job
    from evaluation.tasks import eval_texts
    from stages.preflight import write_eval_tasks

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    teacher = Path(cfg.teacher.path).resolve()
    tasks_dir = run_dir / "eval" / "tasks"
    write_eval_tasks(cfg.taskworld, cfg.evaluate, tasks_dir)
    data = run_dir / "data"
    prepare = prepare_job(
        teacher,
        cfg.effective_data(),
        data,
        taskworld=cfg.taskworld,
        calibration_source=cfg.prune.calibration_source,
        calibration_samples=cfg.prune.calibration_samples,
        max_prompt_tokens=cfg.generate.max_prompt_tokens(read_model_config(teacher)),
    )
    prepare_data(prepare, eval_texts(cfg.evaluate, tasks_dir))
    prune = PruneJob(
        teacher=Checkpoint(path=teacher, identity=None),
        calibration=data / "calibration.jsonl",
        calibration_sha=None,
        prune=cfg.prune,
        dtype=cfg.teacher.dtype,
        device=device,
        out_dir=run_dir / "pruned",
    )
    kept_layers = prune_model(prune)["kept_layers"]
    need_logits = cfg.distill.teacher_source == "cached"
    online = cfg.distill.teacher_source == "online"
    generate_data(
        GenerateJob(teacher=Checkpoint(path=teacher, identity=None), prompts=data / "prompts.jsonl", prompts_sha=None,
                    generate=cfg.generate, need_logits=need_logits, device="cpu", run_dir=run_dir),
        log=lambda m: None,
    )  # fmt: skip
    models = {"teacher": teacher, "pruned": run_dir / "pruned"}
    for name, kd in (("student", True), ("sft", False)):
        distill_student(
            DistillJob(student=Checkpoint(path=run_dir / "pruned", identity=None), data_dir=data,
                       logits_dir=run_dir / "logits", data_sha=None, distill=cfg.distill, kd=kd, device=device,
                       out_dir=run_dir / name, teacher_layers=kept_layers,
                       # As stages/distill.py declares it: the online teacher for KD only.
                       teacher=Checkpoint(path=teacher, identity=None) if kd and online else None)
        )  # fmt: skip
        models[name] = run_dir / name
    for path in models.values():
        evaluate_checkpoint(standalone_job(path, cfg.evaluate, tasks_dir, device=device, dtype=cfg.teacher.dtype))
    return time.perf_counter() - t0


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds, proc


WARM = "from prefect import flow\n@flow\ndef warm():\n    return 1\nwarm()\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="direct/flow pairs, interleaved; medians are reported (run-to-run spread on 2 cores is a few percent)",
    )
    ap.add_argument("--direct", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.direct:  # the baseline, in its own process
        from compress.config import load_config

        direct(load_config(args.direct[0]), Path(args.direct[1]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from common import write_result

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home = tmp / "prefect-home"
        home.mkdir()
        env = os.environ | {"PREFECT_HOME": str(home)}
        first_use_s, _ = _timed([sys.executable, "-c", WARM], env)
        cfg_path = tmp / "bench.yaml"
        cfg_path.write_text((ROOT / args.config).read_text())
        base, ours = [], []
        for i in range(args.repeats):
            t, _ = _timed(
                [sys.executable, str(Path(__file__).resolve()), "--direct", str(cfg_path), str(tmp / f"direct{i}")], env
            )
            base.append(t)
            print(f"direct stage functions: {t:.1f}s", flush=True)
            run = [sys.executable, "-m", "flows.cli", "run", str(cfg_path), "--set", f"runs_dir={tmp / f'runs{i}'}"]
            t, proc = _timed(run, env)
            assert "0/9 stages were cache hits" in proc.stdout, proc.stdout[-1000:]
            ours.append(t)
            print(f"through Prefect: {t:.1f}s", flush=True)
        base_s, ours_s = statistics.median(base), statistics.median(ours)
        rerun_s, proc = _timed(run, env)
        if "every stage a cache hit" not in proc.stdout:
            raise SystemExit(f"cached re-run did not hit every stage:\n{proc.stdout[-2000:]}")
        print(f"cached re-run: {rerun_s:.1f}s", flush=True)

    overhead = 100.0 * (ours_s - base_s) / base_s
    out = {
        "benchmark": "overhead",
        "config": args.config,
        "ours": {
            "what": "distillflow run: the Prefect flow (tasks, cache, manifest, artifacts), new process",
            "seconds": round(ours_s, 2),
            "samples": [round(t, 2) for t in ours],
        },
        "baseline": {
            "what": "the same stage functions called directly, new process",
            "seconds": round(base_s, 2),
            "samples": [round(t, 2) for t in base],
        },
        "ratio": round(ours_s / base_s, 4),
        "overhead_pct": round(overhead, 2),
        "cached_rerun_s": round(rerun_s, 2),
        "first_use_s": round(first_use_s, 2),
        "targets": {"overhead_pct": 5, "cached_rerun_s": 15},
    }
    write_result("overhead", out)
    print(f"overhead: {overhead:+.1f}% (target < 5)   cached re-run: {rerun_s:.1f}s (target < 15)")


if __name__ == "__main__":
    main()
