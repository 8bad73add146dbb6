"""Depth pruning: drop whole decoder layers with the lowest importance, save a loadable checkpoint.

The result is a stock Hugging Face checkpoint (same architecture class, fewer layers) that loads in
``transformers`` and in vLLM: layers are renumbered 0..L'-1, ``num_hidden_layers`` is updated and a
per-layer ``layer_types`` list (sliding/full attention patterns) is rewritten for the kept layers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from compress.config import PruneConfig
from compress.lineage import write_json
from compress.models import count_params, load_model, load_tokenizer, save_checkpoint, torch_dtype
from compress.prune.importance import block_influence, decoder_layers


def layers_to_keep(scores: list[float], target_layers: int) -> list[int]:
    """Indices of the ``target_layers`` most important layers, in their original order."""
    if not 1 <= target_layers <= len(scores):
        raise ValueError(f"prune.target_layers={target_layers} must be between 1 and {len(scores)}")
    ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return sorted(ranked[:target_layers])


def drop_layers(model, keep: list[int]):
    """Keep only the decoder layers ``keep`` (in place) and fix the config to match."""
    layers = decoder_layers(model)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        # The KV cache is indexed by layer_idx; stale indices would collide after renumbering.
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    model.model.layers = kept
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    return model


def prune_depth(
    teacher_dir: Path,
    calibration_texts: list[str],
    cfg: PruneConfig,
    out_dir: Path,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Score layers on ``calibration_texts``, drop the least important, save to ``out_dir``.

    The teacher is loaded in ``dtype`` on ``device``. Writes ``importance.json`` beside the
    checkpoint and returns the pruning record (scores, kept layers, parameter counts, seconds).
    """
    t0 = time.time()
    model = load_model(teacher_dir, torch_dtype(dtype), device, trust_remote_code)
    tokenizer = load_tokenizer(teacher_dir, trust_remote_code)
    n_layers = len(decoder_layers(model))
    if cfg.target_layers > n_layers:
        raise ValueError(f"prune.target_layers={cfg.target_layers} exceeds the teacher's {n_layers} layers")
    params_before = count_params(model)
    calib_tok = load_tokenizer(teacher_dir, trust_remote_code)  # a copy: the saved tokenizer stays as shipped
    if calib_tok.pad_token is None:  # many base models ship without one; padding is masked out anyway
        calib_tok.pad_token = calib_tok.eos_token
    scores = block_influence(model, calib_tok, calibration_texts, cfg.batch_size, cfg.calibration_seq_len)
    keep = layers_to_keep(scores, cfg.target_layers)
    drop_layers(model, keep)
    save_checkpoint(model, tokenizer, Path(out_dir))
    record = {
        "method": "depth/block_influence",
        "scores": scores,
        "kept_layers": keep,
        "dropped_layers": [i for i in range(n_layers) if i not in keep],
        "params_before": params_before,
        "params_after": count_params(model),
        "calibration_texts": len(calibration_texts),
        "device": str(device),
        "seconds": round(time.time() - t0, 2),
    }
    write_json(Path(out_dir).parent / "importance.json", record)
    return record
