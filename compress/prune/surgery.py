"""Cut a model down to kept layers, heads, neurons and hidden channels, on its state dict.

Every tensor is sliced by name (the family adapter says where things live), then loaded strictly
into a model built from the new config: a key that is missing, unexpected or of the wrong shape is
an error here, never a silently broken checkpoint.

Hidden-channel pruning shrinks the residual stream: embedding columns, every norm over the hidden
size, the input columns of q/k/v/gate/up, the output rows of o_proj/down, lm_head columns. RMSNorm
then averages over fewer channels, so each such norm's weight is scaled by sqrt(H/H') and the norm
epsilon by H/H': a channel that carried nothing can be removed without changing the output, and
the kept channels keep their scale (Minitron retrains that scale away; we do not make the student
relearn it). Gemma's
embeddings are multiplied by sqrt(hidden_size) from the config: they are rescaled by sqrt(H/H') to
match, and with tied embeddings the final norm absorbs that factor for lm_head.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from compress.prune.families import Family
from compress.prune.shape import Shape, config_for, head_dim_of, shape_of

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class Keep:
    """What survives, by original index. ``None`` keeps every unit of that kind."""

    layers: list[int]
    heads: dict[int, list[int]] | None = None  # per layer: kept query heads (whole KV groups' members)
    kv_heads: dict[int, list[int]] | None = None  # per layer: kept KV heads
    neurons: dict[int, list[int]] | None = None  # per layer: kept MLP neurons
    channels: list[int] | None = None  # kept hidden channels (shared by every layer)


def _rows(units: list[int], size: int) -> list[int]:
    return [u * size + k for u in units for k in range(size)]


def _take(t: torch.Tensor, dim: int, idx: list[int] | None) -> torch.Tensor:
    if idx is None:
        return t
    return t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))


class _Slicer:
    """Slices one layer's (or the globals') tensors for a ``Keep`` plan."""

    def __init__(self, config, family: Family, keep: Keep):
        t = shape_of(config)
        self.family, self.keep = family, keep
        self.hd = head_dim_of(config)
        self.n_heads, self.n_kv, self.inter = t.num_attention_heads, t.num_key_value_heads, t.intermediate_size
        self.channels = keep.channels
        h_new = len(keep.channels) if keep.channels is not None else t.hidden_size
        self.rms_scale = math.sqrt(t.hidden_size / h_new)

    def norm(self, w: torch.Tensor, extra: float = 1.0) -> torch.Tensor:
        off = self.family.norm_offset
        return (off + _take(w, 0, self.channels).float()) * (self.rms_scale / extra) - off

    def layer(self, i: int, name: str, t: torch.Tensor) -> torch.Tensor:
        f, k, ch = self.family, self.keep, self.channels
        heads = k.heads.get(i) if k.heads else None
        kv = k.kv_heads.get(i) if k.kv_heads else None
        neurons = k.neurons.get(i) if k.neurons else None
        module, _, kind = name.rpartition(".")
        q_rows = _rows(heads, self.hd) if heads is not None else None
        kv_rows = _rows(kv, self.hd) if kv is not None else None
        if module in f.layer_norms:
            return self.norm(t).to(t.dtype)
        if module in f.head_norms:
            return t
        if module == "self_attn.qkv_proj":  # Phi-3: [Q | K | V]
            q = q_rows if q_rows is not None else list(range(self.n_heads * self.hd))
            kvr = kv_rows if kv_rows is not None else list(range(self.n_kv * self.hd))
            off_k, off_v = self.n_heads * self.hd, (self.n_heads + self.n_kv) * self.hd
            rows = [*q, *(off_k + r for r in kvr), *(off_v + r for r in kvr)]
            return self._linear(t, kind, rows, ch)
        if module == "self_attn.q_proj":
            return self._linear(t, kind, q_rows, ch)
        if module in ("self_attn.k_proj", "self_attn.v_proj"):
            return self._linear(t, kind, kv_rows, ch)
        if module == "self_attn.o_proj":
            return self._linear(t, kind, ch, q_rows)
        if module == "mlp.gate_up_proj":  # Phi-3: [gate | up]
            rows = None if neurons is None else [*neurons, *(self.inter + j for j in neurons)]
            return self._linear(t, kind, rows, ch)
        if module in ("mlp.gate_proj", "mlp.up_proj"):
            return self._linear(t, kind, neurons, ch)
        if module == "mlp.down_proj":
            return self._linear(t, kind, ch, neurons)
        raise ValueError(f"{f.name}: no pruning rule for layer tensor '{name}'")

    @staticmethod
    def _linear(t: torch.Tensor, kind: str, rows: list[int] | None, cols: list[int] | None) -> torch.Tensor:
        if kind == "bias":
            return _take(t, 0, rows)
        return _take(_take(t, 0, rows), 1, cols)


def prune_state_dict(state: dict[str, torch.Tensor], config, family: Family, keep: Keep) -> dict[str, torch.Tensor]:
    """The state dict of the pruned model (layers renumbered 0..L'-1)."""
    s = _Slicer(config, family, keep)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embed_scale = s.rms_scale if family.embed_scaled else 1.0
    new_index = {old: new for new, old in enumerate(keep.layers)}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = LAYER_KEY.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i in new_index:
                out[f"model.layers.{new_index[i]}.{rest}"] = s.layer(i, rest, t).contiguous()
        elif key == "model.embed_tokens.weight":
            out[key] = (_take(t, 1, s.channels).float() * embed_scale).to(t.dtype).contiguous()
        elif key == "lm_head.weight":
            if not tied:
                out[key] = _take(t, 1, s.channels).contiguous()
        elif key == "model.norm.weight":
            # Tied + scaled embeddings: lm_head got embed_scale too; the final norm takes it back out.
            out[key] = s.norm(t, extra=embed_scale if tied else 1.0).to(t.dtype).contiguous()
        else:
            raise ValueError(f"{family.name}: no pruning rule for tensor '{key}'")
    return out


def pruned_config(config, family: Family, keep: Keep):
    """``config`` with the kept sizes, ``num_hidden_layers`` and per-layer ``layer_types`` rewritten."""
    t = shape_of(config)
    first = keep.layers[0]
    shape = Shape(
        num_layers=len(keep.layers),
        hidden_size=len(keep.channels) if keep.channels is not None else t.hidden_size,
        intermediate_size=len(keep.neurons[first]) if keep.neurons else t.intermediate_size,
        num_attention_heads=len(keep.heads[first]) if keep.heads else t.num_attention_heads,
        num_key_value_heads=len(keep.kv_heads[first]) if keep.kv_heads else t.num_key_value_heads,
    )
    new = config_for(config, shape, family)
    if shape.hidden_size != t.hidden_size and getattr(config, family.eps_field, None):
        # With eps scaled like the weights, sqrt(S/H' + eps') = sqrt(H/H') * sqrt(S/H + eps) exactly.
        setattr(new, family.eps_field, getattr(config, family.eps_field) * t.hidden_size / shape.hidden_size)
    if getattr(config, "layer_types", None):
        # Written explicitly: the defaults would be recomputed by the new indices.
        new.layer_types = [config.layer_types[i] for i in keep.layers]
    return new


def build_pruned(model, family: Family, keep: Keep):
    """A new model (same class) holding the pruned weights of ``model``; strict load, on CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = pruned_config(model.config, family, keep)
    state = prune_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config, family, keep)
    dtype = next(model.parameters()).dtype
    with no_init_weights():  # every weight is loaded next: random init of billions of params is waste
        new = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing, unexpected = new.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"pruned state dict does not fit {type(new).__name__}: missing {missing}, unexpected {unexpected}"
        )
    if tied:
        new.tie_weights()
    if model.generation_config is not None:
        new.generation_config = model.generation_config
    return new
