"""Layer importance on calibration data.

ShortGPT block influence (arXiv 2403.03853): for decoder layer i with input X_i and output X_{i+1},

    BI_i = 1 - E_t[ cos(X_{i,t}, X_{i+1,t}) ]

averaged over the non-padding tokens of the calibration set. Inputs and outputs are captured with
forward hooks on the decoder layers, not from ``output_hidden_states`` (whose last entry is after
the final norm in recent transformers, which would bias the last layer's score).
"""

from __future__ import annotations

import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a Llama-style causal LM (``model.model.layers``)."""
    try:
        return model.model.layers
    except AttributeError as e:
        raise ValueError(f"{type(model).__name__}: no model.layers; unsupported architecture") from e


@torch.no_grad()
def block_influence(
    model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int | None = None
) -> list[float]:
    """ShortGPT block influence of every decoder layer (higher = more important).

    Texts longer than ``max_length`` tokens are truncated; inputs go to the model's device.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    state: dict[str, torch.Tensor] = {}

    def hook(idx: int):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [B, T]
            sums[idx] += (cos * state["mask"]).sum().double()

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        tokenizer.padding_side = "right"
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=max_length is not None,
                max_length=max_length,
            ).to(model.device)
            state["mask"] = enc["attention_mask"].float()
            count += int(enc["attention_mask"].sum())
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("calibration set is empty")
    return [float(1.0 - s / count) for s in sums]
