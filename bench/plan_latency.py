"""Latency of ``distillflow plan`` (ours) against ``distillflow --help`` (baseline: the CLI's bare start-up).

``plan`` validates the config, reads the teacher's config.json and safetensors headers, the data
sources' first rows and the evaluation task names, and predicts the cache from the run's manifest,
all without loading weights. The target is under 5 s on ``configs/tiny.yaml``. Each command runs
``--repeats`` times in a fresh process; the median is reported, with the ratio to the baseline.
Results go to ``bench/results/plan_latency.json``.

    .venv/bin/python bench/plan_latency.py [--config configs/tiny.yaml] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import ROOT, write_result


def timed(args: list[str], repeats: int) -> float:
    """Median wall time of ``python -m flows.cli ARGS`` over ``repeats`` fresh processes."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    base = timed(["--help"], args.repeats)
    ours = timed(["plan", args.config], args.repeats)
    result = {
        "benchmark": "plan_latency",
        "config": args.config,
        "ours": {"what": f"distillflow plan {args.config}", "median_s": round(ours, 3)},
        "baseline": {"what": "distillflow --help", "median_s": round(base, 3)},
        "ratio": round(ours / base, 3),
        "target_s": 5.0,
    }
    write_result("plan_latency", result)
    print(f"plan: {ours:.2f}s   --help: {base:.2f}s   ratio: {ours / base:.2f}x   (target: plan < 5 s)")


if __name__ == "__main__":
    main()
