"""What the bench scripts share: the random Llama they time, and how their results are written.

The Llama's shape comes from the command line (``add_model_args``) and is built by
``compress.bootstrap.random_llama``, the builder the tests use too. Every result file records the
machine and the package versions beside the figures (``write_result``).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

from compress.lineage import package_versions, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def add_model_args(ap: argparse.ArgumentParser, flag: str) -> None:
    """``flag`` (a checkpoint of the user's), else the shape of the Llama built in its place:
    ``--hidden``, ``--layers``, ``--ffn``, ``--heads`` and ``--kv-heads``. The defaults (hidden 1024,
    8 layers, FFN 2816, 8 heads / 4 KV heads of 128) make it big enough that compute, not
    per-request overhead, sets the pace."""
    ap.add_argument(flag, type=Path, help="a checkpoint of yours instead of the built one")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)


def build_random_llama(out_dir: Path, args: argparse.Namespace) -> Path:
    """The Llama shaped by ``add_model_args`` (context 128), random weights, saved to ``out_dir``."""
    # Imported here: torch and transformers are only needed by the scripts that build a model.
    from compress.bootstrap import random_llama
    from compress.config import ArchConfig

    arch = ArchConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.ffn,
        max_position_embeddings=128,
    )
    return random_llama(arch, out_dir)


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``result``, then the machine and the package versions, to ``bench/results/<name>.json``."""
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    return write_json(RESULTS / f"{name}.json", result | {"machine": machine, "packages": package_versions()})
