"""A tiny GGUF teacher written with gguf's own writer, for tests that need a GGUF file offline.

``write_tiny_gguf(path)`` builds a random Llama (2 layers, hidden 64, 2 query heads and 1 KV head
of head_dim 32, so vLLM's CPU attention accepts it) with a byte-level BPE tokenizer trained here
on a few sentences, and writes both into one GGUF file the way llama.cpp's converter does:
llama.cpp's tensor names, q/k rows permuted for its rotary layout, the vocabulary, token types,
merges, special token ids and a ChatML chat template in the metadata. Tensors are F32, so the
values round-trip exactly. The returned reference model is what the GGUF must load back as.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A teacher model answers questions; the student learns from the teacher.",
    "Pruning removes layers, heads and neurons that matter least.",
    "Hello world! How are you today? 12345 + 678 = 13023",
    "the the the then there these those other mother brother",
]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, CONTEXT = 64, 2, 1, 32, 128, 128


@dataclass
class TinyGGUF:
    """A written tiny GGUF file and the transformers model it was written from."""

    path: Path
    reference: object  # LlamaForCausalLM: what the file must load back as
    vocab_size: int


def byte_bpe(vocab_size: int = 320) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, llama.cpp token types, merges) of a byte-level BPE trained on ``CORPUS``."""
    from gguf import TokenType
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) and tokens[:3] == list(SPECIALS)
    types = [int(TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, types, merges


def reference_llama(vocab_size: int, num_layers: int = 2, tied: bool = True, seed: int = 0):
    """A random Llama whose logits are far from ties (large initializer, norms away from 1)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        initializer_range=0.5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter reorders q/k rows from HF's rotate-half layout to interleaved pairs;
    # transformers' GGUF loader undoes exactly this.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class GGUFSpec:
    """What varies between the tiny GGUF files: the metadata's names, the depth, the tying, the seed.

    ``arch`` and ``tokenizer_model`` only name them in the metadata (the tensors stay a Llama's and
    the vocabulary a byte-level BPE), so a test can write a file transformers refuses.
    """

    arch: str = "llama"
    num_layers: int = 2
    tied: bool = True
    seed: int = 0
    name: str = "tiny-llama"
    tokenizer_model: str = "gpt2"


def write_tiny_gguf(path: Path, spec: GGUFSpec = GGUFSpec()) -> TinyGGUF:
    """Write a tiny Llama with its tokenizer to ``path`` as an F32 GGUF, as ``spec`` says."""
    import gguf

    tokens, types, merges = byte_bpe()
    model = reference_llama(len(tokens), spec.num_layers, spec.tied, spec.seed)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, spec.num_layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, spec.arch)
    w.add_name(spec.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(spec.tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for hf_name, tensor in model.state_dict().items():
        if spec.tied and hf_name == "lm_head.weight":
            continue  # a tied GGUF has no output.weight: the loader ties it to token_embd
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.detach().float().numpy().copy()
        if base.endswith("self_attn.q_proj"):
            data = _permute(data, HEADS)
        elif base.endswith("self_attn.k_proj"):
            data = _permute(data, KV_HEADS)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyGGUF(path, model, len(tokens))
