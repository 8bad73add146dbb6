"""Which teacher the generate stage talks to, and the stage's work from rows to files.

``open_teacher`` yields one of: our own vLLM server (started from its virtualenv on loopback, a
fresh random API key, its log in the run directory, restarted when it dies), a server elsewhere
(``generate.endpoint``, its key read from the named environment variable), or transformers in this
process (``generate.backend: hf``). The generate stage is the same for all three.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress.config import GenerateConfig
from compress.generate.run import Generator, Progress, check_rows
from compress.generate.teacher import HFTeacher, HTTPTeacher, Teacher
from compress.hub import read_model_config, text_config
from compress.serving.vllm_server import Supervisor, VLLMServer


def endpoint_key(cfg: GenerateConfig) -> str | None:
    """The endpoint's API key from its environment variable; a one-line error when it is not set."""
    if cfg.endpoint is None or not cfg.endpoint.api_key_env:
        return None
    key = os.environ.get(cfg.endpoint.api_key_env)
    if not key:
        raise ValueError(f"generate.endpoint.api_key_env: ${cfg.endpoint.api_key_env} is not set")
    return key


@contextlib.contextmanager
def open_teacher(
    cfg: GenerateConfig,
    teacher_dir: Path,
    log_path: Path,
    trust_remote_code: bool = False,
    device: str = "cpu",
    log=print,
) -> Iterator[Teacher]:
    """The teacher for ``cfg``: an endpoint, our own supervised vLLM server, or transformers."""
    if cfg.backend == "hf":
        dtype = "float32" if cfg.dtype == "auto" else cfg.dtype  # the same compute dtype as a served teacher
        log(f"teacher in process with transformers ({device}, {dtype})")
        yield HFTeacher(teacher_dir, device, dtype, trust_remote_code)
        return
    if cfg.endpoint is not None:
        key = endpoint_key(cfg)
        log(f"teacher served at {cfg.endpoint.url} ({cfg.endpoint.model})")
        yield HTTPTeacher(cfg.endpoint.url, cfg.endpoint.model, key, cfg.concurrency, cfg.request_timeout_s)
        return
    server = VLLMServer(
        Path(teacher_dir),
        python=cfg.vllm_python,
        log_path=log_path,
        dtype=cfg.dtype,
        max_model_len=cfg.context_length(read_model_config(Path(teacher_dir))),
        max_logprobs=cfg.top_k,
        kv_cache_gib=cfg.kv_cache_gib,
        startup_timeout_s=cfg.startup_timeout_s,
        extra_args=["--trust-remote-code"] if trust_remote_code else None,
        threads=cfg.server_threads,
    )
    with server:
        log(f"vLLM server ready at {server.base_url} (log {log_path})")
        supervisor = Supervisor(server, cfg.max_restarts)
        teacher = HTTPTeacher(
            lambda: server.base_url,
            server.served_name,
            server.api_key,
            cfg.concurrency,
            cfg.request_timeout_s,
            on_error=supervisor.on_error,
        )
        try:
            yield teacher
        finally:
            teacher.server_restarts = server.restarts
        if server.restarts:
            log(f"the vLLM server was restarted {server.restarts} time(s)")


def vocab_size(model_dir: Path) -> int:
    """The model's vocabulary (rows of its output layer), from ``config.json``."""
    size = text_config(read_model_config(model_dir)).get("vocab_size")
    if not size:
        raise ValueError(f"{model_dir}/config.json: no vocab_size")
    return int(size)


def generate_data(
    teacher_dir: Path,
    rows: list[dict[str, Any]],
    cfg: GenerateConfig,
    run_dir: Path,
    need_logits: bool = True,
    trust_remote_code: bool = False,
    device: str = "cpu",
    progress: Progress | None = None,
    teacher_id: str = "",
    log=print,
) -> dict[str, Any]:
    """The generate stage: ``run_dir/data/train.jsonl`` and ``run_dir/logits/`` from ``rows``.

    Shards go to ``run_dir/generate.work/`` and stay there until the stage has merged them, so a
    stage that is restarted after any failure resumes where it stopped.
    """
    from compress.models import load_tokenizer

    run_dir = Path(run_dir)
    check_rows(rows, cfg)  # before a server starts
    tokenizer = load_tokenizer(Path(teacher_dir), trust_remote_code)
    work = run_dir / "generate.work"
    with open_teacher(cfg, teacher_dir, run_dir / "logs" / "vllm-server.log", trust_remote_code, device, log) as t:
        gen = Generator(rows, cfg, t, tokenizer, work, need_logits, progress, teacher_id)
        if gen.n_shards and gen.resumed:
            log(f"resuming: {gen.resumed} of {gen.n_shards} shards are on disk")
        stats = gen.run(run_dir / "data", run_dir / "logits", vocab_size(teacher_dir))
    stats["server_restarts"] = getattr(t, "server_restarts", 0)
    return stats
