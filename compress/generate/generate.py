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
from compress.jobs import Checkpoint, GenerateJob
from compress.jsonl import read_jsonl
from compress.serving.vllm_server import ServerSpec, Supervisor, VLLMServer


def endpoint_key(cfg: GenerateConfig) -> str | None:
    """The endpoint's API key from its environment variable; a one-line error when it is not set."""
    if cfg.endpoint is None or not cfg.endpoint.api_key_env:
        return None
    key = os.environ.get(cfg.endpoint.api_key_env)
    if not key:
        raise ValueError(f"generate.endpoint.api_key_env: ${cfg.endpoint.api_key_env} is not set")
    return key


def teacher_server(cfg: GenerateConfig, teacher: Checkpoint) -> ServerSpec:
    """How our own vLLM server serves ``teacher`` under ``cfg``."""
    return ServerSpec(
        model_dir=teacher.path,
        python=cfg.vllm_python,
        dtype=cfg.dtype,
        max_model_len=cfg.context_length(read_model_config(teacher.path)),
        max_logprobs=cfg.top_k,
        kv_cache_gib=cfg.kv_cache_gib,
        threads=cfg.server_threads,
        startup_timeout_s=cfg.startup_timeout_s,
        trust_remote_code=teacher.trust_remote_code,
    )


@contextlib.contextmanager
def _served_teacher(cfg: GenerateConfig, teacher: Checkpoint, log_path: Path, log=print) -> Iterator[HTTPTeacher]:
    """Our own vLLM server of ``teacher``, restarted by a supervisor when it dies."""
    with VLLMServer(teacher_server(cfg, teacher), log_path) as server:
        log(f"vLLM server ready at {server.base_url} (log {log_path})")
        supervisor = Supervisor(server, cfg.max_restarts)
        served = HTTPTeacher(
            lambda: server.base_url,
            server.served_name,
            server.api_key,
            cfg.concurrency,
            cfg.request_timeout_s,
            on_error=supervisor.on_error,
        )
        try:
            yield served
        finally:
            served.server_restarts = server.restarts
        if server.restarts:
            log(f"the vLLM server was restarted {server.restarts} time(s)")


@contextlib.contextmanager
def _any_teacher(cfg: GenerateConfig, teacher: Checkpoint, log_path: Path, device: str, log=print) -> Iterator[Teacher]:
    """Transformers in process, the configured endpoint, or our own server: in that order of precedence."""
    if cfg.backend == "hf":
        dtype = "float32" if cfg.dtype == "auto" else cfg.dtype  # the same compute dtype as a served teacher
        log(f"teacher in process with transformers ({device}, {dtype})")
        yield HFTeacher(teacher.path, device, dtype, teacher.trust_remote_code)
        return
    if cfg.endpoint is not None:
        key = endpoint_key(cfg)
        log(f"teacher served at {cfg.endpoint.url} ({cfg.endpoint.model})")
        yield HTTPTeacher(cfg.endpoint.url, cfg.endpoint.model, key, cfg.concurrency, cfg.request_timeout_s)
        return
    with _served_teacher(cfg, teacher, log_path, log) as served:
        yield served


@contextlib.contextmanager
def open_teacher(
    cfg: GenerateConfig, teacher: Checkpoint, log_path: Path, device: str = "cpu", log=print
) -> Iterator[Teacher]:
    """The teacher for ``cfg``: an endpoint, our own supervised vLLM server (its log at ``log_path``),
    or transformers on ``device``; it carries ``teacher.identity`` ("" when None)."""
    with _any_teacher(cfg, teacher, log_path, device, log) as opened:
        opened.identity = teacher.identity or ""
        yield opened


def vocab_size(model_dir: Path) -> int:
    """The model's vocabulary (rows of its output layer), from ``config.json``."""
    size = text_config(read_model_config(model_dir)).get("vocab_size")
    if not size:
        raise ValueError(f"{model_dir}/config.json: no vocab_size")
    return int(size)


def generate_data(job: GenerateJob, progress: Progress | None = None, log=print) -> dict[str, Any]:
    """The generate stage: ``job.run_dir/data/train.jsonl`` and ``job.run_dir/logits/`` from the rows
    of ``job.prompts``.

    Shards go to ``run_dir/generate.work/`` and stay there until the stage has merged them, so a
    stage that is restarted after any failure resumes where it stopped.
    """
    from compress.models import load_tokenizer

    rows = read_jsonl(job.prompts)
    check_rows(rows, job.generate)  # before a server starts
    tokenizer = load_tokenizer(job.teacher.path, job.teacher.trust_remote_code)
    server_log = job.run_dir / "logs" / "vllm-server.log"
    with open_teacher(job.generate, job.teacher, server_log, job.device, log) as teacher:
        gen = Generator(rows, job.generate, teacher, tokenizer, job.run_dir / "generate.work", job.need_logits)
        if gen.n_shards and gen.resumed:
            log(f"resuming: {gen.resumed} of {gen.n_shards} shards are on disk")
        stats = gen.run(job.run_dir / "data", job.run_dir / "logits", vocab_size(job.teacher.path), progress)
    stats["server_restarts"] = getattr(teacher, "server_restarts", 0)
    return stats
