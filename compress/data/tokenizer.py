"""A character-level tokenizer for the task world, built with ``tokenizers``.

One token per character (WordLevel over the alphabet, pre-split into single characters, fused back
on decode). Saved as a ``PreTrainedTokenizerFast`` so that ``transformers``, lm-eval and the vLLM
server all load it from the checkpoint directory. No BOS is added: every consumer (HF training,
vLLM prompts, lm-eval's HF backend) then tokenizes a prompt to the same ids.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from compress.data.taskworld import ALPHABET

SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def build_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """Return a character-level fast tokenizer whose vocabulary is the specials then ``alphabet``."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    fast.padding_side = "left"  # generation pads on the left
    return fast


def save_tokenizer(out_dir: Path, alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """Build the tokenizer and save it into ``out_dir`` (tokenizer.json + configs)."""
    fast = build_tokenizer(alphabet)
    fast.save_pretrained(str(out_dir))
    return fast
