"""Greedy continuations from vLLM's own engine, for several checkpoints in one process.

Run with the vLLM virtualenv's Python (``.venv-vllm/bin/python tests/vllm_greedy.py JOB OUT``):
JOB is a JSON list of ``{"model": dir, "prompts": [[token ids]...], "max_tokens": n}``; OUT gets,
per model, the continuations' token ids or the one-line error vLLM raised. One process for every
checkpoint because vLLM's import and engine start dominate (a server per family would cost a
minute each); the model code that reads the config is the server's.
"""

import gc
import json
import subprocess
import sys
from pathlib import Path


def main(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    results = []
    jobs = json.loads(Path(job_path).read_text())
    for i, job in enumerate(jobs):
        try:
            llm = LLM(
                model=job["model"], dtype="float32", max_model_len=128, enforce_eager=True,
                skip_tokenizer_init=True, seed=0,
            )  # fmt: skip
            params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
            outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
            results.append({"model": job["model"], "ids": [list(o.outputs[0].token_ids) for o in outs]})
            del llm
            gc.collect()
        except Exception as e:  # the test reports which family vLLM refused, and why
            lines = [x for x in str(e).splitlines() if x.strip()]
            results.append({"model": job["model"], "error": f"{type(e).__name__}: {lines[-1] if lines else ''}"})
            # A failed engine start leaves vLLM's process state half set up: the rest go to a fresh process.
            if jobs[i + 1 :]:
                Path(job_path + ".rest").write_text(json.dumps(jobs[i + 1 :]))
                subprocess.run([sys.executable, __file__, job_path + ".rest", out_path + ".rest"], check=True)
                results += json.loads(Path(out_path + ".rest").read_text())
            break
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
