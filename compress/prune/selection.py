"""Which layers, heads, neurons and channels to keep for a target shape.

``importance`` keeps the highest-scoring units (Minitron, ShortGPT); ``random`` (seeded) and
``last_layers`` (drop the deepest layers and the highest-index width units) are the baselines that
importance has to beat at the same shape. Width is uniform across layers (one config for all), but
which units survive is chosen per layer. Heads are chosen GQA-aware: whole KV groups first (only
when fewer KV heads are asked for), then the same number of query heads inside every kept group.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from compress.prune.shape import Shape, shape_of
from compress.prune.surgery import Keep


def _pick(scores: Sequence[float], k: int, how: str, rng: random.Random) -> list[int]:
    """``k`` of ``len(scores)`` indices, ascending."""
    n = len(scores)
    if k >= n:
        return list(range(n))
    if how == "importance":
        chosen = sorted(range(n), key=lambda i: scores[i], reverse=True)[:k]
    elif how == "random":
        chosen = rng.sample(range(n), k)
    else:  # last_layers: the highest indices go
        chosen = list(range(k))
    return sorted(chosen)


def _heads(scores: list[float], n_kv: int, shape: Shape, how: str, rng: random.Random) -> tuple[list[int], list[int]]:
    """Kept KV groups and kept query heads (grouped by KV head, same count per group) of one layer."""
    per_group = len(scores) // n_kv
    group_scores = [sum(scores[g * per_group : (g + 1) * per_group]) for g in range(n_kv)]
    groups = _pick(group_scores, shape.num_key_value_heads, how, rng)
    keep_per_group = shape.num_attention_heads // shape.num_key_value_heads
    heads = []
    for g in groups:
        members = scores[g * per_group : (g + 1) * per_group]
        heads += [g * per_group + j for j in _pick(members, keep_per_group, how, rng)]
    return groups, heads


def select(
    config,
    importance: dict,
    shape: Shape,
    how: str = "importance",
    depth_metric: str = "block_influence",
    seed: int = 0,
) -> Keep:
    """The ``Keep`` plan that turns ``config``'s model into ``shape``."""
    t = shape_of(config)
    rng = random.Random(seed)
    depth_scores = importance.get(depth_metric)
    if depth_scores is None:
        raise ValueError(f"importance has no '{depth_metric}' scores")
    layers = _pick(depth_scores, shape.num_layers, how, rng)
    keep = Keep(layers=layers)
    if (shape.num_attention_heads, shape.num_key_value_heads) != (t.num_attention_heads, t.num_key_value_heads):
        keep.heads, keep.kv_heads = {}, {}
        for i in layers:
            keep.kv_heads[i], keep.heads[i] = _heads(importance["heads"][i], t.num_key_value_heads, shape, how, rng)
    if shape.intermediate_size != t.intermediate_size:
        keep.neurons = {i: _pick(importance["neurons"][i], shape.intermediate_size, how, rng) for i in layers}
    if shape.hidden_size != t.hidden_size:
        keep.channels = _pick(importance["channels"], shape.hidden_size, how, rng)
    return keep
