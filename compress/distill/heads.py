"""What the chunked loss reads of a model: its decoder's states and its lm_head, apart.

The chunked loss (``compress.distill.chunked``) computes logits itself, a chunk of tokens at a
time, from the states before the lm_head. Features:
  * ``decoder_states``: the final-norm output (and, if asked, every layer's output) from the
    model's own forward (DDP and peft wrappers see it) with no ``[B, T, V]`` logits made, padded
    (``attention_mask``) or packed (``position_ids``) batches alike;
  * ``output_head``: the lm_head as a ``Head``, Gemma-2's logit soft-capping included, cut to the
    vocabulary two models share;
  * ``check_head``: refuses a model whose logits are more than ``lm_head(final hidden)``;
  * ``shared_vocab``: the logit rows a student and a teacher share when their embedding matrices
    are padded differently; tokenizers that differ are a one-line error naming the first id.
"""

from __future__ import annotations

import torch

from compress.distill.chunked import Head
from compress.student import vocab_difference


def output_head(model, vocab: int | None = None) -> Head:
    """The model's lm_head as a ``Head`` (Gemma-2's soft-capping included), cut to ``vocab`` rows."""
    out = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None) or getattr(
        getattr(model.config, "text_config", None), "final_logit_softcapping", None
    )
    weight, bias = out.weight, out.bias
    if vocab is not None and vocab < weight.shape[0]:
        weight, bias = weight[:vocab], (bias[:vocab] if bias is not None else None)
    return Head(weight, bias, cap)


def decoder_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    all_layers: bool = False,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """``[B, T, H]`` states after the final norm (the lm_head's input), and each layer's output if asked.

    The model's own forward (so that DDP and peft wrappers see it) with ``logits_to_keep=1``: the
    lm_head runs on one position only, so no ``[B, T, V]`` logits are made. transformers returns the
    final norm's output as the last hidden state; ``check_head`` verifies that for each model.
    A packed batch (``make_collator(pack=True)``) gives ``position_ids`` and no attention mask.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    states = out.hidden_states
    return states[-1], (tuple(states[1:]) if all_layers else None)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` hidden states after the final norm (the lm_head's input); works through peft."""
    return decoder_states(model, input_ids, attention_mask)[0]


def check_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """The chunked loss recomputes logits as ``Head(hidden)``: refuse a model whose forward does more."""
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        got = output_head(model).logits(final_hidden(model, input_ids, attention_mask))
    err = (want - got).abs().max().item()
    if err > 1e-3 * max(1.0, want.abs().max().item()):
        raise ValueError(
            f"{type(model).__name__}: its logits are not lm_head(final hidden) (max difference {err:.3g}); "
            "the chunked KD loss does not support this architecture"
        )


def shared_vocab(student, teacher, student_tok=None, teacher_tok=None) -> int:
    """Logit rows both models share: the smaller vocabulary, when the rest is padding.

    Checkpoints often pad the embedding matrix past the tokenizer (to a multiple of 64 or 128); two
    models whose tokenizers agree differ only in those rows. Different tokenizers cannot be
    distilled token by token: that is a one-line error naming the first id that differs.
    """
    v_s = student.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if student_tok is not None and teacher_tok is not None:
        diff = vocab_difference(teacher_tok, student_tok)
        if diff is not None:
            raise ValueError(
                f"the teacher's and the student's tokenizers differ ({diff}): token-level KD needs one tokenizer"
            )
        if min(v_s, v_t) < len(student_tok):
            raise ValueError(f"a model has fewer logit rows ({min(v_s, v_t)}) than its tokenizer ({len(student_tok)})")
    return min(v_s, v_t)
