"""Synthetic data from a vLLM-served teacher: completions plus top-k teacher log-probs per token.

Prompts go to the OpenAI-compatible ``/v1/completions`` endpoint in batches (a list of prompts per
request, several requests in flight), as token ids when the data stage tokenized them. Each request
asks for ``logprobs = k`` and ``return_tokens_as_token_ids`` so that every token comes back as an
exact id ("token_id:N"), not a decoded string that could collide. Generation stops at
``generate.stop`` (the task world's newline), which is kept in the output
(``include_stop_str_in_output``) because the student must learn to end its answer; with no stop
strings it ends at the model's EOS token, which is kept too.

Output layout (inside the run directory):
  data/train.jsonl      one row per prompt: id, task, prompt, answer, completion, token_ids, offset, n_tokens
  logits/ids.npy        int32   [total_tokens, k]  teacher top-k ids per completion token
  logits/logprobs.npy   float32 [total_tokens, k]  their log-probs (raw distribution, T = 1)
  logits/meta.json      k, rows, tokens
Rows address their tokens by ``offset`` / ``n_tokens``; the arrays load memory-mapped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from compress.config import GenerateConfig
from compress.data.taskworld import write_jsonl
from compress.lineage import write_json

Progress = Callable[[float, str], None]
_ID_PREFIX = "token_id:"


class GenerationError(RuntimeError):
    """A request to the teacher server failed after its retries (transient: the stage may retry)."""


class RequestRejected(RuntimeError):
    """The teacher server refused a request (4xx): a retry cannot help."""


def _token_id(key: str) -> int:
    if not key.startswith(_ID_PREFIX):
        raise GenerationError(f"expected '{_ID_PREFIX}N' token keys (return_tokens_as_token_ids), got {key!r}")
    return int(key[len(_ID_PREFIX) :])


def parse_choice(choice: dict[str, Any], k: int) -> tuple[str, list[int], np.ndarray, np.ndarray]:
    """Text, token ids and the ``[n, k]`` top-k ids / log-probs of one completion choice.

    vLLM returns k or k + 1 entries per position (the sampled token is added when outside the
    top-k); we keep the k most likely, and pad with -inf if fewer came back.
    """
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") or []
    tops = lp.get("top_logprobs") or []
    ids = np.zeros((len(tokens), k), dtype=np.int32)
    lps = np.full((len(tokens), k), -np.inf, dtype=np.float32)
    for t, top in enumerate(tops):
        items = sorted(((v, _token_id(key)) for key, v in (top or {}).items()), reverse=True)[:k]
        for j, (v, tid) in enumerate(items):
            ids[t, j] = tid
            lps[t, j] = max(v, -9999.0)
    return choice["text"], [_token_id(t) for t in tokens], ids, lps


async def _complete(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], retries: int = 3
) -> list[dict[str, Any]]:
    delay = 1.0
    for attempt in range(retries + 1):
        try:
            r = await client.post(url, json=body)
            if r.status_code >= 500:
                raise httpx.HTTPStatusError(f"server error {r.status_code}", request=r.request, response=r)
            if r.status_code != 200:
                # A 4xx is our request's fault: retrying cannot help.
                raise RequestRejected(f"teacher server rejected the request ({r.status_code}): {r.text[:300]}")
            return sorted(r.json()["choices"], key=lambda c: c["index"])
        except (httpx.TransportError, httpx.HTTPStatusError) as e:
            if attempt == retries:
                raise GenerationError(f"request failed after {retries} retries: {e}") from e
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


async def _generate_all(
    base_url: str,
    model: str,
    prompts: list[str] | list[list[int]],
    cfg: GenerateConfig,
    progress: Progress | None,
    api_key: str | None = None,
) -> list[dict[str, Any]]:
    url = f"{base_url}/v1/completions"
    batches = [prompts[i : i + cfg.prompts_per_request] for i in range(0, len(prompts), cfg.prompts_per_request)]
    results: list[list[dict[str, Any]] | None] = [None] * len(batches)
    sem = asyncio.Semaphore(cfg.concurrency)
    done = 0

    async def run(i: int, batch: list, client: httpx.AsyncClient) -> None:
        nonlocal done
        body = {
            "model": model,
            "prompt": batch,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "logprobs": cfg.top_k,
            "stop": cfg.stop,
            "include_stop_str_in_output": bool(cfg.stop),
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        async with sem:
            results[i] = await _complete(client, url, body)
        if len(results[i]) != len(batch):
            raise GenerationError(f"asked for {len(batch)} completions, got {len(results[i])}")
        done += 1
        if progress:
            progress(done / len(batches), f"{done}/{len(batches)} batches")

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=cfg.request_timeout_s, headers=headers) as client:
        await asyncio.gather(*(run(i, b, client) for i, b in enumerate(batches)))
    return [c for batch in results for c in batch]  # type: ignore[union-attr]


def generate_with_logprobs(
    base_url: str,
    served_name: str,
    rows: list[dict[str, Any]],
    cfg: GenerateConfig,
    data_dir: Path,
    logits_dir: Path,
    progress: Progress | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Complete every row's ``prompt`` with the served teacher; write ``data_dir`` and ``logits_dir``.

    Returns statistics: rows, tokens, seconds, tokens/s and the fraction of completions that match
    the reference answer (the teacher's own accuracy on the training prompts).
    """
    t0 = time.time()
    # Token ids when the data stage tokenized the prompts: the teacher then sees exactly the tokens
    # the student trains on (no second tokenization, no doubled BOS).
    prompts = [r["prompt_ids"] if r.get("prompt_ids") else r["prompt"] for r in rows]
    choices = asyncio.run(_generate_all(base_url, served_name, prompts, cfg, progress, api_key))
    out_rows, all_ids, all_lps = [], [], []
    offset = 0
    for row, choice in zip(rows, choices, strict=True):
        text, token_ids, ids, lps = parse_choice(choice, cfg.top_k)
        out_rows.append(
            row | {"completion": text, "token_ids": token_ids, "offset": offset, "n_tokens": len(token_ids)}
        )
        all_ids.append(ids)
        all_lps.append(lps)
        offset += len(token_ids)
    logits_dir = Path(logits_dir)
    logits_dir.mkdir(parents=True, exist_ok=True)
    np.save(logits_dir / "ids.npy", np.concatenate(all_ids) if all_ids else np.zeros((0, cfg.top_k), np.int32))
    np.save(logits_dir / "logprobs.npy", np.concatenate(all_lps) if all_lps else np.zeros((0, cfg.top_k), np.float32))
    write_json(logits_dir / "meta.json", {"k": cfg.top_k, "rows": len(out_rows), "tokens": offset})
    write_jsonl(out_rows, Path(data_dir) / "train.jsonl")
    seconds = time.time() - t0
    with_answer = [r for r in out_rows if r.get("answer") is not None]
    correct = sum(r["completion"].strip() == r["answer"].strip() for r in with_answer)
    return {
        "rows": len(out_rows),
        "tokens": offset,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(offset / seconds, 1) if seconds else None,
        "teacher_train_exact_match": correct / len(with_answer) if with_answer else None,
    }
