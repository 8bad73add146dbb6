"""Parameter counts of a decoder at any pruned shape: by arithmetic when it is exact, else from the model class.

``distillflow plan`` must size the student in well under a second, and importing transformers'
config classes alone pulls in torch and scikit-learn (about 4 s on 2 cores). So the pruner reads
the teacher's ``config.json`` as a dict (``ConfigView``) and counts parameters by arithmetic: each
tensor of a supported family is a product of the sizes pruning changes (``formula_params``).

The arithmetic is trusted only when it reproduces the teacher's own checkpoint: the sum of the
tensor sizes in its safetensors headers (read without torch). When it does not (a config field the
formula does not know, an extra tensor), or when the weights are not on disk to compare with and
the family is not one the formula covers, the count comes from the model class itself, built on
the meta device with one and two layers (``meta_params``: exact for any family, no weights
allocated, but it needs torch and transformers). Either way the same counter sizes the student in
``plan`` and in the prune stage, so the two always agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from compress.prune.families import Family
from compress.prune.shape import Shape, config_for, head_dim_of, shape_of

Counter = Callable[[Shape], int]


class ConfigView:
    """A ``config.json`` (its text part) read as attributes, with the family's class defaults.

    Enough of a transformers config for shapes and counts: ``hidden_size``, ``head_dim`` and the
    rest are looked up in the dict, then in ``defaults`` (what the family's config class would
    fill in), else ``None``.
    """

    def __init__(self, config: dict[str, Any], defaults: dict[str, Any] | None = None):
        self._config = dict(config)
        self._defaults = defaults or {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._config:
            return self._config[name]
        return self._defaults.get(name)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._config)


def formula_params(config, shape: Shape, family: Family) -> int:
    """Parameters of ``family`` at ``shape`` by arithmetic: embeddings, attention, MLP, norms, lm_head.

    Biases follow the config where the family's class honours the switch (``attention_bias`` on
    q/k/v/o, ``mlp_bias`` on the MLP) and the family (Qwen2's q/k/v always have them); head norms
    (Qwen3's q/k norms) are over head_dim.
    """
    h, i, n, kv = shape.hidden_size, shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads
    hd = head_dim_of(config)
    q, k = n * hd, kv * hd
    attention = h * q + 2 * h * k + q * h + len(family.head_norms) * hd
    if family.qkv_bias or _switch(config, family, "attention_bias"):
        attention += q + 2 * k
    if _switch(config, family, "attention_bias"):
        attention += h  # o_proj's bias
    mlp = 3 * h * i + ((2 * i + h) if _switch(config, family, "mlp_bias") else 0)
    layer = attention + mlp + len(family.layer_norms) * h
    vocab = config.vocab_size
    tied = getattr(config, "tie_word_embeddings", None)
    tied = family.tied_default if tied is None else tied
    return vocab * h + shape.num_layers * layer + h + (0 if tied else vocab * h)


def _switch(config, family: Family, name: str) -> bool:
    return name in family.bias_fields and bool(getattr(config, name, False))


def meta_params(config, shape: Shape, family: Family) -> int:
    """Parameters of ``config``'s model class at ``shape``, built on the meta device with one and two layers."""
    one, two = (_meta_count(config_for(config, replace(shape, num_layers=n), family)) for n in (1, 2))
    return one + (shape.num_layers - 1) * (two - one)


def _meta_count(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def counter_for(config: ConfigView, family: Family, on_disk: int | None, model_dir: Path, remote: bool) -> Counter:
    """The parameter counter for ``config``'s family: the formula when it gives the teacher's
    ``on_disk`` count (``None``: no weights on disk, the formula is used as it stands), else the
    model class's count from the config as transformers reads it."""
    if on_disk is None or formula_params(config, shape_of(config), family) == on_disk:
        return lambda shape: formula_params(config, shape, family)
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=remote)
    real = getattr(real, "text_config", None) or real
    return lambda shape: meta_params(real, shape, family)
