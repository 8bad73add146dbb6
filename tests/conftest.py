"""Shared fixtures: offline settings, an isolated Prefect home, tiny models built here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    """A private PREFECT_HOME so tests never touch a user's Prefect database or cache."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(home / "storage")
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 4-layer Llama with the task-world tokenizer, saved as a checkpoint."""
    from compress.bootstrap import random_llama
    from compress.config import ArchConfig

    arch = ArchConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128
    )
    return random_llama(arch, tmp_path_factory.mktemp("models") / "tiny-llama")


# A chat template for the tiny task-world teacher (it has none): turns as "role: text" lines, so a
# user turn ends at the newline, which the teacher writes.
LINES = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"  # noqa: E501


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    """The shipped tiny teacher with a chat template (it has none of its own)."""
    import shutil

    from compress.models import load_tokenizer

    out = tmp_path_factory.mktemp("teacher") / "teacher-chat"
    shutil.copytree(ROOT / "assets" / "teacher-tiny", out)
    (out / "chat_template.jinja").write_text(LINES)
    assert load_tokenizer(out).chat_template == LINES
    return out


def require_vllm() -> None:
    if not VLLM_PYTHON.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{VLLM_PYTHON} missing: CI must create the vLLM venv (make venvs)")
        pytest.skip("no .venv-vllm (run `make venvs`)")
