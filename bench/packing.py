"""Padding-free packing (``train.pack``) against padded batches: training speed, same job, same run.

The job is the default teacher's (``configs/bootstrap.yaml``): its Llama shape built here with
random weights, trained with CE on the first ``steps x batch_size`` rows of its task world, where
short task rows (~15-20 characters) sit beside whole language texts (up to ~50), so a padded batch
is mostly padding. Both sides train the same model from the same weights on the same rows in the
same order (``train_causal_lm``, the bootstrap's and distill stage's trainer); only the batch layout
differs. The two alternate ``--repeats`` times; the figures are medians of the training wall time
(Trainer's ``train_runtime``: model building and saving excluded).

Prints and writes ``bench/results/packing.json``: seconds per step for each side, ``speedup``
(padded seconds over packed seconds; target > 1), the token positions each side computes per step
(padding included) and the final losses of both (they should agree: the loss is the same).

    .venv/bin/python bench/packing.py [--steps 40] [--batch-size 64] [--repeats 2] [--config configs/bootstrap.yaml]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from compress.bootstrap import answer_examples
from compress.config import BootstrapConfig, load_config
from compress.data.taskworld import world_splits
from compress.data.tokenizer import build_tokenizer
from compress.distill.batches import make_collator, pad_id
from compress.distill.trainer import TrainRun, train_causal_lm
from compress.lineage import package_versions, write_json
from compress.models import build_llama

ROOT = Path(__file__).resolve().parents[1]


def positions_per_step(examples: list[dict], batch_size: int, pad: int, pack: bool) -> float:
    """Mean token positions (padding included) of the batches, as the collator lays them out."""
    collate = make_collator(pad, None, pack=pack)
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    return statistics.mean(collate(b)["input_ids"].numel() for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/bootstrap.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    cfg = load_config(ROOT / args.config, model_cls=BootstrapConfig)
    n = args.steps * args.batch_size
    world = cfg.taskworld.model_copy(update={"n_train": n})
    rows, _ = world_splits(world)
    tok = build_tokenizer()
    examples = answer_examples(tok, rows)
    train = cfg.train.model_copy(update={"max_steps": args.steps, "batch_size": args.batch_size})
    runs: dict[str, list[dict]] = {"padded": [], "packed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for side in ("padded", "packed"):
                model = build_llama(cfg.arch, tok, seed=train.seed)
                t = train.model_copy(update={"pack": side == "packed"})
                m = train_causal_lm(TrainRun(model, tok, t), examples, Path(tmp) / side)
                runs[side].append(m)
                print(f"{side}: {m['seconds']:.1f} s for {m['steps']} steps, final loss {m['final_loss']:.4f}")

    def per_step(side: str) -> float:
        return statistics.median(m["seconds"] / m["steps"] for m in runs[side])

    pad = pad_id(tok)
    result = {
        "config": args.config,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds_per_step": {side: round(per_step(side), 4) for side in runs},
        "speedup": round(per_step("padded") / per_step("packed"), 3),
        "positions_per_step": {
            side: round(positions_per_step(examples, args.batch_size, pad, side == "packed"), 1) for side in runs
        },
        "tokens_per_step": round(sum(len(e["input_ids"]) for e in examples) / args.steps, 1),
        "final_loss": {side: [round(m["final_loss"], 5) for m in runs[side]] for side in runs},
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "packages": package_versions(),
    }
    out = ROOT / "bench" / "results" / "packing.json"
    write_json(out, result)
    print(
        f"packed {result['seconds_per_step']['packed']:.3f} s/step vs padded {result['seconds_per_step']['padded']:.3f}"
        f" s/step: speedup {result['speedup']:.2f}x ({result['positions_per_step']['packed']:.0f} vs"
        f" {result['positions_per_step']['padded']:.0f} positions per step for"
        f" {result['tokens_per_step']:.0f} tokens); written to {out.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
