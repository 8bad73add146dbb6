"""lm-eval wall time through our two backends, same checkpoint, same tasks, same run.

``hf`` is lm-eval's in-process transformers model; ``vllm`` is the checkpoint served by the vLLM
server from ``.venv-vllm`` and driven by lm-eval's ``local-completions`` (``evaluate.backend``).
The tasks are the task world's held-out split (generation, exact match; ``--heldout`` examples)
and a 3-way multiple-choice version of it (log-likelihood, accuracy). The checkpoint is a Llama
built here with random weights (timing does not depend on what the weights learned), big enough
that compute sets the pace (``--hidden`` etc.; ``--model DIR`` uses a checkpoint of yours). The
vLLM server's start-up is timed apart from the evaluation: it is paid once per model.

Writes ``bench/results/eval_backends.json`` with both wall times, ``speedup`` (hf seconds over
vllm seconds, start-up excluded), ``speedup_with_startup`` and whether the scores agree.

    .venv/bin/python bench/eval_backends.py [--heldout 500] [--hidden 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import ROOT, add_model_args, build_random_llama, write_result

from compress.config import EvaluateConfig, TaskWorldConfig
from compress.data.taskworld import make_splits
from compress.models import checkpoint_params
from evaluation.harness import (
    _completions_args,
    _env,
    _hf_args,
    _run_lm_eval,
    parse_scores,
    serve_for_eval,
    standalone_job,
    write_choice_task,
    write_task,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "--model")
    ap.add_argument("--heldout", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    world = TaskWorldConfig(n_heldout=args.heldout)
    _, heldout = make_splits(world.tasks, world.n_train, world.n_heldout, world.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or build_random_llama(tmp / "model", args)
        write_task(heldout, tmp / "tasks", max_gen_toks=16)
        cfg = EvaluateConfig(
            tasks=["taskworld", "taskworld_mc"],
            include_path=write_choice_task(heldout, tmp / "mc", "taskworld_mc").parent,
            batch_size=args.batch_size,
            vllm={"vllm_python": ROOT / ".venv-vllm" / "bin" / "python", "max_model_len": 128},
        )
        # Both backends in the checkpoint's own dtype ("auto"), so that they score the same model.
        job = standalone_job(model, cfg, tmp / "tasks", dtype="auto", log_dir=tmp)
        t0 = time.perf_counter()
        hf = _run_lm_eval("hf", _hf_args(job), job, 0)
        hf_s = time.perf_counter() - t0
        print(f"hf: {hf_s:.1f}s", flush=True)
        t0 = time.perf_counter()
        with serve_for_eval(model, cfg, "auto", False, "model", tmp / "vllm.log") as server:
            startup_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            # lm-eval's API models read the server's key from the environment only.
            with _env(OPENAI_API_KEY=server.api_key):
                vl = _run_lm_eval("local-completions", _completions_args(server, job), job, 0)
            vllm_s = time.perf_counter() - t1
        print(f"vllm: {vllm_s:.1f}s (+ {startup_s:.1f}s server start-up)", flush=True)
        params = checkpoint_params(model)
    scores = {"hf": parse_scores(hf["results"]), "vllm": parse_scores(vl["results"])}
    out = {
        "benchmark": "eval_backends",
        "what": "lm-eval wall time, same checkpoint and tasks (generation + log-likelihood): hf vs vLLM-served",
        "params": params,
        "heldout": args.heldout,
        "hf_seconds": round(hf_s, 2),
        "vllm_seconds": round(vllm_s, 2),
        "vllm_startup_seconds": round(startup_s, 2),
        "speedup": round(hf_s / vllm_s, 3),
        "speedup_with_startup": round(hf_s / (vllm_s + startup_s), 3),
        "scores": scores,
        "scores_agree": scores["hf"] == scores["vllm"],
    }
    write_result("eval_backends", out)
    print(f"vllm over hf: {out['speedup']:.2f}x faster ({out['speedup_with_startup']:.2f}x with start-up); "
          f"scores agree: {out['scores_agree']}")  # fmt: skip


if __name__ == "__main__":
    main()
