"""Importance of layers, attention heads, MLP neurons and hidden channels on calibration data.

Depth (ShortGPT, arXiv 2403.03853): for decoder layer i with input X_i and output X_{i+1},

    BI_i = 1 - E_t[ cos(X_{i,t}, X_{i+1,t}) ]

over the non-padding tokens, and (Minitron) the increase of the calibration LM loss when layer i
alone is skipped. Inputs and outputs are captured with forward hooks on the decoder layers, not
from ``output_hidden_states`` (whose last entry is after the final norm in recent transformers).

Width (Minitron, arXiv 2407.14679), forward-only activations:
  head h     input of o_proj, the head's head_dim channels; score = L2 over those channel scores
  neuron j   input of down_proj (act(gate(x)) * up(x)), channel j
  channel c  outputs of the norms feeding attention and MLP in every layer, summed over them
Per channel, each sample's mean |a| over its tokens, then over the batch: L2 (sqrt of the sum of
squares, Model-Optimizer's choice, the default) or the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from compress.prune.families import Family


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a causal LM (``model.model.layers``)."""
    try:
        return model.model.layers
    except AttributeError as e:
        raise ValueError(f"{type(model).__name__}: no model.layers; unsupported architecture") from e


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's hidden-states input, however the model passed it."""
    return args[0] if args else kwargs["hidden_states"]


@dataclass(frozen=True)
class Calibration:
    """The calibration texts and how they are fed to a model.

    ``starts[i]`` is the character where text i's completion begins: the loss counts only targets
    from there on (all of them where it is 0 or not given, or the tokenizer cannot map tokens to
    characters). ``max_length`` truncates each text (None: whole texts).
    """

    tokenizer: Any
    texts: list[str]
    starts: list[int] | None = None
    batch_size: int = 32
    max_length: int | None = None

    def batches(self, device) -> Iterator[tuple[dict, torch.Tensor]]:
        """Tokenized batches on ``device`` and their loss masks over next-token targets ([B, T-1])."""
        tokenizer, starts, size = self.tokenizer, self.starts, self.batch_size
        tokenizer.padding_side = "right"
        offsets = starts is not None and any(starts) and getattr(tokenizer, "is_fast", False)
        for i in range(0, len(self.texts), size):
            enc = tokenizer(
                self.texts[i : i + size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_offsets_mapping=offsets,
            )
            mask = enc["attention_mask"][:, 1:].bool()
            if offsets:
                begin = torch.as_tensor(starts[i : i + size])[:, None]
                mask &= enc.pop("offset_mapping")[:, 1:, 0] >= begin
            yield enc.to(device), mask.to(device)


def _nll_sums(logits: torch.Tensor, enc: dict, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over the ``mask``ed targets of a batch, and their count."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, enc["input_ids"][:, 1:, None]).squeeze(-1)
    return float(nll[mask].sum()), int(mask.sum())


class _ChannelScores:
    """Per-channel activation importance, accumulated batch by batch (see the module docstring)."""

    def __init__(self, aggregation: str):
        self.aggregation = aggregation
        self.acc: torch.Tensor | None = None
        self.samples = 0

    def add(self, act: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask[..., None].to(act.dtype)
        per_sample = (act.abs().float() * m).sum(1) / m.sum(1).clamp(min=1)  # [B, C]
        part = per_sample.pow(2).sum(0) if self.aggregation == "l2" else per_sample.sum(0)
        self.acc = part.double() if self.acc is None else self.acc + part.double()
        self.samples += act.shape[0]

    def scores(self) -> torch.Tensor:
        assert self.acc is not None, "no calibration batch was seen"
        return self.acc.sqrt() if self.aggregation == "l2" else self.acc / self.samples


class _Ticker:
    """Calls ``progress(fraction, message)`` at most every 5% of ``total`` steps."""

    def __init__(self, total: int, progress: Callable[[float, str], None] | None):
        self.total, self.progress, self.done, self.last = max(1, total), progress, 0, -1.0

    def step(self, what: str) -> None:
        self.done += 1
        fraction = self.done / self.total
        if self.progress and (fraction - self.last >= 0.05 or self.done == self.total):
            self.progress(fraction, f"{what} ({self.done}/{self.total} calibration batches)")
            self.last = fraction


def _module(layer, dotted: str) -> torch.nn.Module:
    for part in dotted.split("."):
        layer = getattr(layer, part)
    return layer


@torch.no_grad()
def measure_importance(
    model,
    family: Family,
    calibration: Calibration,
    aggregation: str = "l2",
    loss_increase: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> dict:
    """Every importance score in one calibration pass (plus one pass per layer for ``loss_increase``).

    Returns ``{"block_influence": [L], "loss_increase": [L] | None, "heads": [L][nH],
    "neurons": [L][I], "channels": [H], "calibration_loss": float, "tokens": int}``. Activations are
    read on every token; the loss counts completions only when ``calibration.starts`` gives where
    they begin.
    """
    layers = decoder_layers(model)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    bi_sums = torch.zeros(len(layers), dtype=torch.float64)
    heads = [_ChannelScores(aggregation) for _ in layers]
    neurons = [_ChannelScores(aggregation) for _ in layers]
    channels = [[_ChannelScores(aggregation) for _ in family.importance_norms] for _ in layers]
    state: dict[str, torch.Tensor] = {}

    def on_layer(i: int):
        def fn(module, args, kwargs, output):
            x_in = _layer_input(args, kwargs)
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            bi_sums[i] += float((cos * state["mask"]).sum())  # a Python float: the model may be on a GPU

        return fn

    def on_input(scores: _ChannelScores):
        return lambda module, args: scores.add(args[0], state["mask"])

    def on_output(scores: _ChannelScores):
        return lambda module, args, output: scores.add(output, state["mask"])

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        handles.append(_module(layer, "self_attn.o_proj").register_forward_pre_hook(on_input(heads[i])))
        handles.append(_module(layer, "mlp.down_proj").register_forward_pre_hook(on_input(neurons[i])))
        for j, norm in enumerate(family.importance_norms):
            handles.append(_module(layer, norm).register_forward_hook(on_output(channels[i][j])))
    model.eval()
    n_batches = -(-len(calibration.texts) // calibration.batch_size)
    ticker = _Ticker(n_batches * (1 + (len(layers) if loss_increase else 0)), progress)
    nll, tokens, count = 0.0, 0, 0
    try:
        for enc, loss_mask in calibration.batches(model.device):
            state["mask"] = enc["attention_mask"].float()
            count += int(enc["attention_mask"].sum())
            s, n = _nll_sums(model(**enc, use_cache=False).logits, enc, loss_mask)
            nll, tokens = nll + s, tokens + n
            ticker.step("importance")
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("calibration set is empty")
    head_dim = heads[0].scores().numel() // n_heads
    base_loss = nll / max(1, tokens)
    out = {
        "block_influence": [float(1.0 - s / count) for s in bi_sums],
        "loss_increase": None,
        "heads": [h.scores().view(n_heads, head_dim).pow(2).sum(-1).sqrt().tolist() for h in heads],
        "neurons": [n.scores().tolist() for n in neurons],
        "channels": torch.stack([c.scores() for per_layer in channels for c in per_layer]).sum(0).tolist(),
        "calibration_loss": base_loss,
        "tokens": tokens,
    }
    if loss_increase:
        out["loss_increase"] = [
            calibration_loss(model, calibration, skip=i, ticker=ticker) - base_loss for i in range(len(layers))
        ]
    return out


@torch.no_grad()
def calibration_loss(model, calibration: Calibration, skip: int | None = None, ticker: _Ticker | None = None) -> float:
    """Mean next-token NLL on the calibration texts (their completions, given ``calibration.starts``).

    ``skip=i`` runs with decoder layer i as the identity.
    """
    handle = None
    if skip is not None:

        def identity(module, args, kwargs, output):
            x_in = _layer_input(args, kwargs)
            return (x_in, *output[1:]) if isinstance(output, tuple) else x_in

        handle = decoder_layers(model)[skip].register_forward_hook(identity, with_kwargs=True)
    model.eval()
    nll, tokens = 0.0, 0
    try:
        for enc, loss_mask in calibration.batches(model.device):
            s, n = _nll_sums(model(**enc, use_cache=False).logits, enc, loss_mask)
            nll, tokens = nll + s, tokens + n
            if ticker is not None:
                ticker.step(f"loss with layer {skip} skipped")
    finally:
        if handle is not None:
            handle.remove()
    return nll / max(1, tokens)


def block_influence(model, calibration: Calibration, family: Family | None = None) -> list[float]:
    """ShortGPT block influence of every decoder layer (higher = more important)."""
    from compress.prune.families import family_of

    fam = family or family_of(model.config)
    return measure_importance(model, fam, calibration)["block_influence"]
