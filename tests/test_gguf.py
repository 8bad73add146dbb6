"""GGUF teachers: a GGUF file becomes a stock, cached checkpoint that loads and serves like any other."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from compress.config import ConfigError, PipelineConfig, TeacherConfig, validate
from compress.generate.teacher import parse_choice
from compress.gguf import SOURCE_FILE, GGUFError, gguf_checkpoint, is_gguf
from compress.hub import resolve_model
from compress.models import load_model, load_tokenizer
from compress.serving.vllm_server import ServerSpec, VLLMServer
from tests.conftest import VLLM_PYTHON, require_vllm
from tests.gguf_fixture import CHAT_TEMPLATE, EOS_ID, GGUFSpec, write_tiny_gguf

TEXTS = [
    "Hello world! How are you today?",
    "  two leading spaces,\ttabs and\nnew lines 12345",
    "unseen words: zebra quixotic ünïcödé",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def converted(tiny, cache):
    ck = gguf_checkpoint(tiny.path, cache_dir=cache)
    assert not ck.cached
    return ck


def _gguf_loaded(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_converted_checkpoint_has_the_gguf_weights(tiny, converted):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = converted.path
    assert out.name == hashlib.sha256(tiny.path.read_bytes()).hexdigest() == converted.sha256
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}  # noqa: SIM118

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    from_gguf, _ = _gguf_loaded(tiny.path)
    ids = torch.randint(3, tiny.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, ref = model(ids).logits, from_gguf(ids).logits, tiny.reference(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # And the model the file was written from: llama.cpp's q/k permutation was undone.
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)

    src = json.loads((out / SOURCE_FILE).read_text())
    assert src["file"] == "tiny.gguf" and src["size"] == tiny.path.stat().st_size
    assert src["sha256"] == converted.sha256 and src["architecture"] == "llama"
    assert src["versions"]["gguf"] and src["versions"]["transformers"]


def test_tokenizer_round_trips_and_keeps_the_chat_template(tiny, converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted.path)
    _, gguf_tok = _gguf_loaded(tiny.path)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == gguf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [EOS_ID]  # one special token
    assert tok.chat_template == CHAT_TEMPLATE
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    gen = json.loads((converted.path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == EOS_ID == tok.eos_token_id


def test_second_call_is_a_cache_hit(tiny, converted, cache, monkeypatch, tmp_path):
    import compress.gguf as g

    before = (converted.path / SOURCE_FILE).stat()

    def no_loading(*a, **k):
        raise AssertionError("a cache hit loaded the GGUF")

    monkeypatch.setattr(g, "_write_checkpoint", no_loading)
    again = gguf_checkpoint(tiny.path, cache_dir=cache)
    assert again.cached and again.path == converted.path and again.sha256 == converted.sha256
    # The cache is keyed by content: the same bytes under another name are the same teacher.
    copy = shutil.copy(tiny.path, tmp_path / "renamed.gguf")
    assert gguf_checkpoint(copy, cache_dir=cache).path == converted.path
    after = (converted.path / SOURCE_FILE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [converted.sha256]


def test_conversion_removes_what_killed_conversions_left(tiny, tmp_path):
    import socket

    sha = hashlib.sha256(tiny.path.read_bytes()).hexdigest()
    host = socket.gethostname()
    dead = tmp_path / "gguf" / f".{sha}.tmp-{host}-999999999-x"  # above any pid_max: no such process
    alive = tmp_path / "gguf" / f".{sha}.tmp-{host}-{os.getpid()}-y"  # a conversion still running
    elsewhere = tmp_path / "gguf" / f".{sha}.tmp-another-host-999999999-z"  # cannot be checked from here
    for d in (dead, alive, elsewhere):
        (d / "half").mkdir(parents=True)
    ck = gguf_checkpoint(tiny.path, cache_dir=tmp_path)
    assert not ck.cached and (ck.path / SOURCE_FILE).is_file()
    assert not dead.exists() and alive.exists() and elsewhere.exists()


def test_teacher_config_accepts_a_gguf_file_or_a_directory_and_gguf_file(tiny, tmp_path):
    cfg = TeacherConfig(path=tiny.path)
    assert cfg.is_local and cfg.gguf_path == tiny.path
    inside = TeacherConfig(path=str(tiny.path.parent), gguf_file="tiny.gguf")
    assert inside.is_local and inside.gguf_path == tiny.path

    def error(teacher: dict) -> str:
        with pytest.raises(ConfigError) as e:
            validate(PipelineConfig, {"teacher": teacher}, "run.yaml")
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    d = tiny.path.parent
    assert f"teacher: gguf_file: GGUF file '{d / 'absent.gguf'}' not found" in error(
        {"path": str(d), "gguf_file": "absent.gguf"}
    )
    assert "name one of its GGUF files in gguf_file (tiny.gguf)" in error({"path": str(d)})
    assert f"teacher.path: GGUF file '{tmp_path / 'no.gguf'}' not found" in error({"path": str(tmp_path / "no.gguf")})
    text = tmp_path / "notes.gguf"
    text.write_text("not weights\n")
    assert f"teacher.path: '{text}': not a GGUF file (bad magic)" in error({"path": str(text)})
    assert "is not a directory" in error({"path": str(tiny.path), "gguf_file": "tiny.gguf"})


def test_resolve_model_converts_once_and_names_the_gguf(tiny, converted, cache, monkeypatch):
    monkeypatch.setenv("DISTILLFLOW_CACHE_DIR", str(cache))
    resolved = resolve_model(TeacherConfig(path=tiny.path), download=False)
    assert resolved.path == converted.path
    assert resolved.identity == f"gguf:{converted.sha256}"
    assert resolved.lineage()["gguf"] == {"file": str(tiny.path.resolve()), "sha256": converted.sha256}
    inside = resolve_model(TeacherConfig(path=str(tiny.path.parent), gguf_file="tiny.gguf"), download=False)
    assert inside.identity == resolved.identity


def _not_gguf(tmp_path: Path, tiny) -> Path:
    p = tmp_path / "weights.gguf"
    p.write_bytes(b"PK\x03\x04 a zip, not a GGUF" * 10)
    return p


def _cut_data(tmp_path: Path, tiny) -> Path:
    data = tiny.path.read_bytes()
    (p := tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    return p


def _cut_header(tmp_path: Path, tiny) -> Path:
    (p := tmp_path / "cut.gguf").write_bytes(tiny.path.read_bytes()[:200])  # inside the metadata
    return p


def _arch(tmp_path: Path, tiny) -> Path:
    return write_tiny_gguf(tmp_path / "foo.gguf", GGUFSpec(arch="foo")).path


def _tokenizer(tmp_path: Path, tiny) -> Path:
    # Passes the header check (a llama); transformers fails on the tokenizer, mid-conversion.
    return write_tiny_gguf(tmp_path / "tok.gguf", GGUFSpec(tokenizer_model="bogus")).path


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_not_gguf, "not a GGUF file (bad magic)"),
        (_cut_data, "truncated"),
        (_cut_header, "truncated"),
        (_arch, "architecture 'foo' cannot be converted (transformers reads GGUF for: "),
        (_tokenizer, "cannot be converted (ValueError: "),
    ],
    ids=["not-gguf", "truncated-data", "truncated-header", "unsupported-architecture", "unsupported-tokenizer"],
)
def test_bad_files_fail_in_one_line_and_leave_nothing_in_the_cache(make, says, tiny, tmp_path):
    path = make(tmp_path, tiny)
    cache = tmp_path / "cache"
    with pytest.raises(GGUFError) as e:
        gguf_checkpoint(path, cache_dir=cache)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError)
    assert "\n" not in msg and msg.startswith(f"teacher.path: '{path}': ") and says in msg, msg
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())
    if says.startswith("architecture"):
        assert "llama" in msg.split("GGUF for: ")[1]


def test_is_gguf(tiny, tmp_path):
    assert is_gguf(tiny.path) and not is_gguf(tmp_path) and not is_gguf(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_vllm_serves_a_converted_gguf_teacher(tiny, converted, tmp_path):
    """The converted checkpoint starts in a real vLLM server, decodes as transformers does, and chats."""
    require_vllm()
    model, tok = load_model(converted.path).eval(), load_tokenizer(converted.path)
    prompt_ids = tok("The teacher", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False, pad_token_id=EOS_ID)
    want = out[0, len(prompt_ids) :].tolist()

    spec = ServerSpec(model_dir=converted.path, python=VLLM_PYTHON, dtype="float32", max_model_len=128)
    server = VLLMServer(spec, tmp_path / "vllm.log")
    with server:
        r = httpx.post(
            f"{server.base_url}/v1/completions",
            json={
                "model": server.served_name,
                "prompt": prompt_ids,
                "max_tokens": 6,
                "temperature": 0.0,
                "ignore_eos": True,
                "logprobs": 1,
                "return_tokens_as_token_ids": True,
                "skip_special_tokens": False,
            },
            headers=server.headers,
            timeout=60,
        )
        r.raise_for_status()
        got = parse_choice(r.json()["choices"][0], 1).ids
        chat = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={"model": server.served_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            headers=server.headers,
            timeout=60,
        )
        chat.raise_for_status()
    assert got[: len(want)] == want, (tok.decode(got), tok.decode(want))
    # vLLM rendered the checkpoint's own chat template: the same prompt tokens as transformers.
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.json()["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
