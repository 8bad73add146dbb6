"""Find a model: a local checkpoint directory, a GGUF file, or a Hugging Face hub id (cache, then hub).

Nothing here imports torch or loads weights, so ``distillflow plan`` can describe a teacher in well
under a second; the one exception is a GGUF teacher's first use, which converts the file into a
cached checkpoint (``compress.gguf``). A hub id resolves to its snapshot directory in the Hugging
Face cache, a GGUF file to its converted directory; every stage, the vLLM server and lm-eval are
then given that directory, so they never go to the network themselves. The identity of a hub
teacher is ``hub:<id>@<commit>`` (the hub's own content address), of a GGUF teacher
``gguf:<sha256 of the file>``; a local teacher is identified by the sha256 of its files.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from compress.config import ConfigError, TeacherConfig, first_line

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are on this machine and what identifies its content."""

    path: Path
    hub_id: str | None = None
    commit: str | None = None
    gguf_file: Path | None = None  # the GGUF file ``path`` was converted from
    gguf_sha256: str | None = None  # that file's sha256

    @property
    def identity(self) -> str | None:
        """``hub:<id>@<commit>`` for a hub model, ``gguf:<sha256>`` for a GGUF file; None for a local
        checkpoint (hash its files instead)."""
        if self.gguf_sha256:
            return f"gguf:{self.gguf_sha256}"
        return f"hub:{self.hub_id}@{self.commit}" if self.hub_id else None

    def lineage(self) -> dict[str, Any]:
        """Where the model came from, for a run's manifest: its directory, and its hub id or GGUF source."""
        out: dict[str, Any] = {"path": str(self.path)}
        if self.hub_id:
            out |= {"hub_id": self.hub_id, "commit": self.commit}
        if self.gguf_file is not None:
            out["gguf"] = {"file": str(self.gguf_file), "sha256": self.gguf_sha256}
        return out


def offline() -> bool:
    """True when the hub must not be asked (HF_HUB_OFFLINE set, or the hub cannot be reached)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    return not hub_reachable()


@cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One HTTP request to the hub (``HF_ENDPOINT``, through any proxy in the environment); cached per process."""
    import httpx

    try:
        httpx.head(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT), timeout=timeout_s)
        return True
    except httpx.HTTPError:
        return False


def go_offline_if_unreachable() -> None:
    """Tell every HF library to stay off the network when the hub is unreachable (no timeouts later)."""
    if offline():
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def resolve_model(cfg: TeacherConfig, download: bool) -> ResolvedModel:
    """Resolve ``cfg.path`` to a local directory.

    With ``download=False`` only ``config.json`` (and the tokenizer files) are fetched for a hub id;
    with ``download=True`` the whole snapshot. Raises ``ConfigError`` (one line naming the id) when
    the id is neither cached nor reachable. A GGUF teacher resolves to its converted checkpoint
    (converted on first use, then cached; ``compress.gguf.GGUFError`` names the file when it cannot be).
    """
    if cfg.gguf_path is not None:
        from compress.gguf import gguf_checkpoint

        field = "teacher.gguf_file" if cfg.gguf_file else "teacher.path"
        ck = gguf_checkpoint(cfg.gguf_path, field=field)
        return ResolvedModel(ck.path, gguf_file=ck.source, gguf_sha256=ck.sha256)
    if cfg.is_local:
        return ResolvedModel(Path(cfg.path).resolve())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = None if download else ["config.json", "*.json", "*.jinja", "tokenizer*", "*.model", "*.txt"]
    try:
        snap = snapshot_download(cfg.path, revision=cfg.revision, allow_patterns=patterns, local_files_only=offline())
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise ConfigError(
            f"teacher.path: '{cfg.path}' is not a local directory, not in the Hugging Face cache, "
            "and the hub is unreachable"
        ) from None
    except GatedRepoError:
        raise ConfigError(
            f"teacher.path: '{cfg.path}' is gated: accept its licence on the hub and log in (hf auth login)"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(f"teacher.revision: '{cfg.revision}' not found in '{cfg.path}'") from None
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise ConfigError(f"teacher.path: hub model '{cfg.path}' not found ({type(e).__name__})") from None
    except HfHubHTTPError as e:
        raise ConfigError(f"teacher.path: '{cfg.path}': hub error: {str(e).splitlines()[0]}") from None
    snap_path = Path(snap)
    if not (snap_path / "config.json").is_file():
        raise ConfigError(f"teacher.path: '{cfg.path}' has no config.json (is it a model repository?)")
    return ResolvedModel(snap_path, hub_id=cfg.path, commit=snap_path.name)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (a one-line ConfigError when it is not JSON)."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the model config ({e})") from None


def chat_template_of(model_dir: Path) -> str | None:
    """The chat template saved beside a checkpoint, read from its files (no transformers import).

    transformers 5 writes ``chat_template.jinja``; older checkpoints hold it in
    ``tokenizer_config.json`` (a string, or a list of named templates) or ``chat_template.json``.
    """
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text() or None
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{path}: cannot read it ({e})") from None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template:
            return template
    return None


def check_tokenizer_files(model_dir: Path, field: str) -> None:
    """The tokenizer beside a checkpoint parses: ``tokenizer.json`` with the Rust ``tokenizers`` (milliseconds),
    else transformers' own loader (a sentencepiece-only tokenizer). One-line ConfigError naming ``field``."""
    model_dir = Path(model_dir)
    fast = model_dir / "tokenizer.json"
    try:
        if fast.is_file():
            import tokenizers

            tokenizers.Tokenizer.from_file(str(fast))
            if (model_dir / "tokenizer_config.json").is_file():
                json.loads((model_dir / "tokenizer_config.json").read_text())
            return
        from compress.models import load_tokenizer

        load_tokenizer(model_dir)
    except Exception as e:  # the library's own error, in one line, for a file we did not write
        raise ConfigError(f"{field}: cannot load the tokenizer from '{model_dir}': {first_line(e)}") from None


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_safetensors_only(model_dir: Path, field: str) -> None:
    """A checkpoint on disk with pickled weights and no safetensors is refused: unpickling can run code."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or any(model_dir.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in model_dir.glob(pattern))
    if pickled:
        raise ConfigError(
            f"{field}: '{model_dir}' holds pickled weights ({', '.join(pickled[:3])}), which can run code when "
            "loaded; only safetensors are loaded: convert them (model.save_pretrained(dir, safe_serialization=True))"
        )


def safetensors_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors headers only.

    Written by hand (8-byte length + JSON header, the format's whole spec) rather than with
    ``safetensors.safe_open`` because that imports torch, which ``plan`` must not pay for.
    """
    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes |= {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    return shapes


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it under text_config)."""
    return config.get("text_config") or config


def estimate_params(config: dict[str, Any]) -> tuple[int, int]:
    """(total, per-layer) parameters of a Llama-style decoder from its config alone.

    Used where no weights are on disk yet (a hub id in ``plan``): embeddings, attention with
    grouped K/V, a gated MLP, two norms per layer, the final norm and an untied lm_head.
    """
    c = text_config(config)
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or h // heads
    inter = c["intermediate_size"]
    bias = (heads + 2 * kv) * head_dim if c.get("attention_bias") or c.get("model_type") == "qwen2" else 0
    per_layer = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + bias + 3 * h * inter + 2 * h
    total = vocab * h + layers * per_layer + h + (0 if c.get("tie_word_embeddings") else vocab * h)
    return total, per_layer


def checkpoint_layout(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Parameter count and per-layer parameters of a checkpoint, exact where its weights are on disk."""
    shapes = safetensors_shapes(model_dir)
    n_layers = text_config(config)["num_hidden_layers"]
    if not shapes:
        total, per_layer = estimate_params(config)
        return {"params": total, "layer_params": [per_layer] * n_layers, "exact": False}
    layer_params = [0] * n_layers
    total = 0
    for name, shape in shapes.items():
        size = 1
        for d in shape:
            size *= d
        total += size
        idx = _layer_index(name)
        if idx is not None and idx < n_layers:
            layer_params[idx] += size
    return {"params": total, "layer_params": layer_params, "exact": True}


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in itertools.pairwise(parts):
        if a == "layers" and b.isdigit():
            return int(b)
    return None
