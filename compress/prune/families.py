"""Decoder families the pruner supports, each one small declarative adapter.

Pruning works on parameter names (``model.layers.{i}.self_attn.q_proj.weight``...), so a family is
described by where its tensors live and by the few ways it differs from Llama: fused projections
(Phi-3), extra norms and a ``1 + w`` norm and scaled embeddings (Gemma2), q/k norms over head_dim
(Qwen3, untouched by pruning), q/k/v biases (Qwen2, sliced with their rows), and whether a loader
derives head_dim from the hidden size (Phi-3 in transformers, Qwen2 in vLLM). A new family is one
new ``Family`` entry in ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one decoder family lays out its tensors (names relative to ``model.layers.{i}.``)."""

    name: str
    # Norms over the hidden size inside each layer (sliced by hidden pruning, RMS-compensated).
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Norms whose outputs feed attention and MLP: Minitron's hidden-channel importance is read here.
    importance_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Norms over head_dim shared by all heads (Qwen3): never sliced.
    head_norms: tuple[str, ...] = ()
    fused_qkv: bool = False  # self_attn.qkv_proj rows = [Q | K | V]
    fused_gate_up: bool = False  # mlp.gate_up_proj rows = [gate | up]
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (offset + w)
    embed_scaled: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size) from the config
    # True where a loader this project serves with takes head_dim = hidden_size // num_attention_heads
    # and ignores any head_dim field: transformers' Phi-3 (it has no such field) and vLLM's Qwen2
    # (vLLM 0.32's qwen2.py; Llama, Mistral, Qwen3 and Gemma2 read the field). There the hidden size
    # moves only in whole heads, so that every server reads the pruned checkpoint as transformers does.
    head_dim_derived: bool = False
    eps_field: str = "rms_norm_eps"  # the config field of the norms' epsilon
    qkv_bias: bool = False  # q/k/v projections always have biases (Qwen2), whatever attention_bias says
    # The config's bias switches the model class honours (attention_bias: q/k/v/o; mlp_bias: gate/up/down).
    bias_fields: tuple[str, ...] = ("attention_bias",)
    tied_default: bool = False  # tie_word_embeddings when config.json leaves it out (the config class's default)


LLAMA = Family("llama", bias_fields=("attention_bias", "mlp_bias"))
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": Family("mistral", bias_fields=()),
    "qwen2": Family("qwen2", head_dim_derived=True, qkv_bias=True, bias_fields=()),
    "qwen3": Family("qwen3", head_norms=("self_attn.q_norm", "self_attn.k_norm")),
    "gemma2": Family(
        "gemma2",
        layer_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        importance_norms=("input_layernorm", "pre_feedforward_layernorm"),
        norm_offset=1.0,
        embed_scaled=True,
        tied_default=True,
    ),
    "phi3": Family("phi3", fused_qkv=True, fused_gate_up=True, head_dim_derived=True, bias_fields=()),
}


class UnsupportedArchitecture(ValueError):
    """A model type the pruner has no adapter for."""


def family_of(config) -> Family:
    """The adapter for a transformers config (by ``model_type``); a clear error lists the supported ones."""
    model_type = getattr(config, "model_type", None)
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"model_type '{model_type}' cannot be pruned; supported: {', '.join(sorted(FAMILIES))}"
        ) from None
