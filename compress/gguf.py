"""GGUF teachers: convert a GGUF file once into a stock safetensors checkpoint, cached by content.

Every stage, the vLLM server and lm-eval read a plain Hugging Face checkpoint directory, so a GGUF
teacher (``teacher.path: model.gguf``, or a directory plus ``teacher.gguf_file``) is converted on
first use and the converted directory is used from then on:

- the header is checked first, cheaply (magic bytes, then ``gguf.GGUFReader``: tensor table,
  truncation, architecture), so a bad file fails in a second with one line naming it;
- transformers' own GGUF loader dequantises the weights (``from_pretrained(..., gguf_file=...)``)
  and builds the tokenizer from the GGUF metadata (vocabulary, merges, special tokens, chat
  template);
- the weights are saved as float32 safetensors (the dequantised values are exact in float32),
  with a ``config.json`` that has no ``quantization_config`` (vLLM refuses ``quant_method: gguf``),
  the tokenizer files, a ``generation_config.json`` whose EOS is the model's end of turn, and
  ``gguf_source.json`` recording where it came from.

The cache lives under ``$DISTILLFLOW_CACHE_DIR`` (default ``~/.cache/distillflow``), in
``gguf/<sha256 of the file>/``; a directory appears there only complete (written to a temporary
sibling, then renamed), so a later call that finds it loads nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from compress.errors import ConfigError, first_line
from compress.lineage import file_sha256

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "gguf_source.json"
BAD_MAGIC = "not a GGUF file (bad magic)"
# Keys of transformers' GGUF mapping that are metadata groups, not architectures.
_NOT_ARCHITECTURES = frozenset({"general", "tokenizer"})


class GGUFError(ConfigError):
    """A GGUF file that cannot be used as a teacher; the message is one line naming the file."""


@dataclass(frozen=True)
class GGUFCheckpoint:
    """A converted GGUF teacher: the checkpoint directory and the file it came from."""

    path: Path  # the converted checkpoint directory
    source: Path  # the GGUF file (resolved)
    sha256: str  # of the GGUF file: the teacher's identity and the cache key
    cached: bool  # True when the directory was already there (nothing was loaded)


@dataclass(frozen=True)
class GGUFHeader:
    """What the header check found: enough to name the file's model before any weight is read."""

    architecture: str
    tensors: int
    name: str | None
    eot_token_id: int | None  # llama.cpp's end-of-turn token, when the file states one


def is_gguf(path: Path | str) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes (reads 4 bytes)."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as fh:
        return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def cache_root() -> Path:
    """Where converted checkpoints live: ``$DISTILLFLOW_CACHE_DIR`` or ``~/.cache/distillflow``."""
    root = os.environ.get("DISTILLFLOW_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "distillflow"


def supported_architectures() -> list[str]:
    """The GGUF architectures this transformers can read (its legacy loader and its newer one)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES)
    with contextlib.suppress(ImportError):  # the newer loader exists from transformers 5.x on
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    return sorted(names - _NOT_ARCHITECTURES)


def _arch_key(name: str) -> str:
    # llama.cpp spells some architectures differently from transformers' table (qwen2moe vs
    # qwen2_moe, gpt-oss vs gpt_oss); transformers maps them by hand in its loader, we compare
    # without separators so that the check accepts what the loader will.
    return name.replace("-", "").replace("_", "").lower()


def read_header(path: Path, field: str = "teacher.path") -> GGUFHeader:
    """Check a GGUF file without loading weights; raise ``GGUFError`` (one line naming it) when unusable.

    Bad magic, a file cut short (the tensor table or the tensor data ends past the end of the
    file), and an architecture transformers cannot read are all caught here.
    """
    path = Path(path)
    where = f"{field}: '{path}'"
    if not path.is_file():
        raise GGUFError(f"{where}: no such file")
    if not is_gguf(path):
        raise GGUFError(f"{where}: {BAD_MAGIC}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails with whatever numpy says when the file ends early
        raise GGUFError(f"{where}: truncated or corrupt GGUF ({first_line(e)})") from None
    if not reader.tensors:
        raise GGUFError(f"{where}: holds no tensors")
    size = path.stat().st_size
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if end > size:
        raise GGUFError(f"{where}: truncated (tensor data ends at byte {end:,}, the file has {size:,})")

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = value("general.architecture")
    if not arch:
        raise GGUFError(f"{where}: no general.architecture in its metadata")
    supported = supported_architectures()
    if _arch_key(arch) not in {_arch_key(a) for a in supported}:
        raise GGUFError(
            f"{where}: architecture '{arch}' cannot be converted (transformers reads GGUF for: {', '.join(supported)})"
        )
    eot = value("tokenizer.ggml.eot_token_id")
    return GGUFHeader(arch, len(reader.tensors), value("general.name"), None if eot is None else int(eot))


def convert_gguf(
    path: Path, out_dir: Path, sha256: str | None = None, field: str = "teacher.path", header: GGUFHeader | None = None
) -> Path:
    """Convert the GGUF file ``path`` into a stock checkpoint at ``out_dir`` (which must not exist).

    Written into a temporary sibling and renamed, so ``out_dir`` is complete or absent. Raises
    ``GGUFError`` for a file transformers cannot load; ``sha256`` (of the file) is computed when
    not given, ``header`` is checked when not given.
    """
    path, out_dir = Path(path).resolve(), Path(out_dir)
    header = header or read_header(path, field)
    sha256 = sha256 or file_sha256(path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out_dir)}{os.getpid()}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from others sharing the cache
    try:
        _write_checkpoint(path, tmp, field, header)
        record = {
            "file": path.name,
            "path": str(path),
            "size": path.stat().st_size,
            "sha256": sha256,
            "architecture": header.architecture,
            "name": header.name,
            "versions": {name: _version(name) for name in ("gguf", "transformers", "torch")},
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # Written last: a directory with this file in it is a finished conversion.
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / SOURCE_FILE).is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def gguf_checkpoint(path: Path | str, field: str = "teacher.path", cache_dir: Path | None = None) -> GGUFCheckpoint:
    """The converted checkpoint of a GGUF file: from the cache, or converted now (see the module docstring).

    The file's sha256 is computed once per call; a cache hit reads nothing else.
    """
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise GGUFError(f"{field}: '{path}': no such file")
    if not is_gguf(src):  # before hashing: a wrong file fails at once
        raise GGUFError(f"{field}: '{path}': {BAD_MAGIC}")
    sha = file_sha256(src)
    out = (cache_dir or cache_root()) / "gguf" / sha
    if (out / SOURCE_FILE).is_file():
        return GGUFCheckpoint(out, src, sha, cached=True)
    _remove_stale_tmp(out)
    convert_gguf(src, out, sha256=sha, field=field)
    return GGUFCheckpoint(out, src, sha, cached=False)


def _write_checkpoint(path: Path, out: Path, field: str, header: GGUFHeader) -> None:
    """Load the GGUF with transformers and save model, tokenizer and generation config into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = f"{field}: '{path}'"
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    except Exception as e:  # transformers' loader raises many types; the caller needs one line
        raise GGUFError(f"{where}: cannot be converted ({type(e).__name__}: {first_line(e)})") from e

    # A GGUF-loaded model refuses save_pretrained (its quantizer is not serialisable): rebuild the
    # same architecture without the quantization block and move the dequantised tensors over.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # On the meta device nothing is allocated or initialised: assign=True hands over the loaded
    # tensors themselves, so the conversion holds one copy of the weights, not two.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = _generation_config(config, tokenizer, header.eot_token_id)
    model.save_pretrained(str(out))
    del loaded, model

    if getattr(config, "max_position_embeddings", None):
        # The GGUF tokenizer comes without a length limit; lm-eval and truncation read this one.
        tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out))

    cfg_file = out / "config.json"
    saved = json.loads(cfg_file.read_text())
    if saved.pop("quantization_config", None) is not None:  # should not happen; vLLM would refuse it
        cfg_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _generation_config(config, tokenizer, eot_token_id: int | None):
    """bos/eos/pad from the GGUF metadata; the end-of-turn token joins EOS when the file names one."""
    from transformers import GenerationConfig

    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
    if eot_token_id is not None and eot_token_id not in eos_ids:
        eos_ids.append(eot_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    return GenerationConfig(
        bos_token_id=config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        pad_token_id=pad,
    )


def _tmp_prefix(out: Path) -> str:
    # The host is in the name because the cache may be shared between machines: only this host's
    # process ids can be checked for life.
    return f".{out.name}.tmp-{socket.gethostname()}-"


def _remove_stale_tmp(out: Path) -> None:
    """Remove temporary directories of ``out`` left by this host's conversions whose process is gone (killed)."""
    if not out.parent.is_dir():
        return
    prefix = _tmp_prefix(out)
    for tmp in out.parent.glob(f"{prefix}*"):
        pid = tmp.name.removeprefix(prefix).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
