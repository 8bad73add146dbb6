"""Load, build and save Hugging Face causal-LM checkpoints.

Checkpoints are plain directories (``config.json``, ``model.safetensors``, tokenizer files) so that
every stage, lm-eval and the vLLM server load them the same way.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from compress.config import ArchConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def build_llama(arch: ArchConfig, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama with the given shape and the tokenizer's vocabulary."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.hidden_size // arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(cfg)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` where a GPU is present, else ``cpu``; an explicit ``cuda`` must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: '{device}' asked for, but torch sees no CUDA device")
    return device


def torch_dtype(name: str) -> torch.dtype | str:
    """A config dtype name as torch wants it (``auto`` = the checkpoint's own dtype)."""
    return name if name == "auto" else getattr(torch, name)


def load_model(
    path: Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load a causal LM from a checkpoint directory onto ``device``."""
    # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when it is loaded.
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return model.to(device)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """Load the tokenizer saved beside a checkpoint (always from the directory: see DESIGN.md)."""
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def save_checkpoint(model: PreTrainedModel, tokenizer, out_dir: Path) -> Path:
    """Save model (safetensors) and tokenizer into a fresh ``out_dir``, replacing it atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def checkpoint_params(model_dir: Path) -> int:
    """Parameters of a checkpoint, read from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in '{model_dir}'")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                total += math.prod(st.get_slice(name).get_shape())
    return total
