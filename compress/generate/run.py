"""The generate stage's work: every training row through the teacher, in resumable shards.

Modes (``generate.mode``):
  completions    the teacher completes each prompt (greedy by default);
  self_distill   the teacher rewrites each row's reference answer given the instruction and the
                 answer ("Self-Data Distillation", SDFT). A rewrite is kept only when the checker
                 finds the original's final answer in it and it does not mention the reference;
                 otherwise the original answer is kept, so no row is dropped.

Teacher cache for KD (only when the distill stage reads it, ``need_logits``):
  topk      the top-k log-probs of every completion token: captured during generation, or by
            teacher forcing (``score``) for text the teacher did not write in this context;
  sampled   ``draws`` ids drawn from the teacher per token with log p of each, stored as unique
            ids with counts ("Sparse Logit Sampling"; unbiased where top-k is not).

Rows are cut into shards of ``generate.shard_size`` in input order. A finished shard is written
to ``work/<fingerprint>/shard-NNNNN/`` under a temporary name and renamed, so a shard is on disk
whole or not at all. A restarted stage (a dead server, a killed worker, a Prefect retry) skips the
shards it finds and redoes the rest; the merge then writes ``data/train.jsonl`` and the logit cache
and checks that every input id is there exactly once, in input order. The fingerprint covers the
rows, the settings and the teacher, so a changed job never reuses stale shards.

Output:
  data/train.jsonl    one row per prompt: the input row plus completion, token_ids, offset, n_tokens
                      (and rewritten, for self_distill)
  logits/             the logit cache (``compress.generate.cache``), when ``need_logits``
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from compress.cachekey import key_content
from compress.config import GenerateConfig, SelfDistillConfig
from compress.generate.cache import CacheWriter
from compress.generate.teacher import Sampling, Teacher
from compress.jsonl import read_jsonl, write_jsonl

Progress = Callable[[float, str], None]


class DataRowError(ValueError):
    """A training row the generate stage cannot use: one line naming the row and the field."""


# --------------------------------------------------------------------------------------- checking


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str, cfg: SelfDistillConfig) -> str | None:
    """The final answer in ``text`` as the checker reads it (None when there is none)."""
    if cfg.checker == "regex":
        m = re.search(cfg.pattern or "", text)
        return m.group(1).strip() if m else None
    numbers = _NUMBER.findall(text)
    if cfg.checker == "final_answer" and numbers:
        return numbers[-1].replace(",", "").rstrip(".")
    return " ".join(text.split()) or None


def accept_rewrite(rewrite: str, original: str, cfg: SelfDistillConfig) -> bool:
    """Whether a self-distilled rewrite may replace the original answer."""
    if not rewrite.strip():
        return False
    low = rewrite.lower()
    if any(p.lower() in low for p in cfg.reject_phrases):
        return False
    if cfg.checker == "none":
        return True
    if cfg.checker == "exact":
        return " ".join(rewrite.split()) == " ".join(original.split())
    want = final_answer(original, cfg)
    if want is None:
        return False
    if cfg.checker == "contains":
        return want in " ".join(rewrite.split())
    return final_answer(rewrite, cfg) == want


# ------------------------------------------------------------------------------------------ rows


def prompt_ids(row: dict[str, Any], tokenizer) -> list[int]:
    """The row's prompt as token ids (as the data stage tokenized it, or tokenized here)."""
    return (
        list(row["prompt_ids"])
        if row.get("prompt_ids")
        else tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    )


def rewrite_prompt(row: dict[str, Any], cfg: SelfDistillConfig, tokenizer) -> list[int]:
    """The self-distillation request for one row, in the chat template where the model has one."""
    instruction = row.get("text") or row["prompt"]
    request = cfg.template.format(instruction=instruction, answer=row["answer"])
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(request, add_special_tokens=False)["input_ids"]


def answer_ids(answer: str, gen: GenerateConfig, tokenizer) -> list[int]:
    """The original answer as a completion: ending as the teacher's would, at the stop string or EOS."""
    if gen.stop:
        return tokenizer(answer + gen.stop[0], add_special_tokens=False)["input_ids"]
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def check_rows(rows: list[dict[str, Any]], cfg: GenerateConfig) -> None:
    """Unique ids, and an answer on every row for self-distillation: before any request is sent."""
    seen: set[str] = set()
    for i, row in enumerate(rows):
        rid = row.get("id")
        if rid is None:
            raise DataRowError(f"prompts row {i}: no 'id'")
        if str(rid) in seen:
            raise DataRowError(f"prompts row {i}: id {rid!r} appears twice (ids must be unique to resume)")
        seen.add(str(rid))
        if cfg.mode == "self_distill" and not isinstance(row.get("answer"), str):
            raise DataRowError(f"generate.mode: self_distill needs an answer on every row; row {rid!r} has none")


def fingerprint(rows: list[dict[str, Any]], cfg: GenerateConfig, teacher: str, need_logits: bool) -> str:
    """What decides the shards' content: rows, settings, teacher and whether logits are kept."""
    h = hashlib.sha256()
    # The settings that decide the teacher's answers (compress.cachekey), and how the rows are cut.
    flags = frozenset({f"mode={cfg.mode}", f"logits={cfg.logits}"})
    h.update(json.dumps([key_content(cfg, flags), cfg.shard_size, teacher, need_logits]).encode())
    for row in rows:
        h.update(json.dumps([row.get("id"), row.get("prompt"), row.get("prompt_ids"), row.get("answer")]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- shards


def _shard_dir(work: Path, i: int) -> Path:
    return work / f"shard-{i:05d}"


def write_shard(path: Path, records: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> None:
    """Write one shard under a temporary name, then rename: it is on disk whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_jsonl(records, tmp / "rows.jsonl")
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    (tmp / "done.json").write_text(json.dumps({"rows": len(records)}))
    tmp.rename(path)


def _concat(parts: list[np.ndarray], width: int, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, width), dtype=dtype)


def unique_counts(ids: np.ndarray, lps: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[n, draws]`` draws -> ``[n, width]`` unique ids, their log p and their counts (0 = padding)."""
    n = len(ids)
    out_ids = np.zeros((n, width), np.int64)
    out_lps = np.full((n, width), -np.inf, np.float32)
    out_counts = np.zeros((n, width), np.uint16)
    for t in range(n):
        u, first, counts = np.unique(ids[t], return_index=True, return_counts=True)
        out_ids[t, : len(u)], out_lps[t, : len(u)], out_counts[t, : len(u)] = u, lps[t][first], counts
    return out_ids, out_lps, out_counts


class Generator:
    """One generate-stage run: the rows, the settings, the teacher and where things go.

    The shards' fingerprint names the teacher by its ``name`` and its ``identity``.
    """

    def __init__(
        self,
        rows: list[dict[str, Any]],
        cfg: GenerateConfig,
        teacher: Teacher,
        tokenizer,
        work_dir: Path,
        need_logits: bool = True,
    ):
        check_rows(rows, cfg)
        self.rows, self.cfg, self.teacher, self.tokenizer = rows, cfg, teacher, tokenizer
        self.need_logits = need_logits
        self.progress: Progress | None = None  # set by run()
        fp = fingerprint(rows, cfg, f"{teacher.name}|{teacher.identity}", need_logits)
        self.work = Path(work_dir) / fp
        # Shards of any other job are stale: this run never reads them.
        if Path(work_dir).is_dir():
            for other in Path(work_dir).iterdir():
                if other != self.work:
                    shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink()
        self.work.mkdir(parents=True, exist_ok=True)
        self.n_shards = math.ceil(len(rows) / cfg.shard_size)
        self.sampling = Sampling(cfg.max_tokens, cfg.temperature, list(cfg.stop), cfg.seed)
        self.pending = [i for i in range(self.n_shards) if not (_shard_dir(self.work, i) / "done.json").is_file()]
        self.resumed = self.n_shards - len(self.pending)
        self.done = self.resumed
        self._bar = None
        self.vocab_size = 1 << 31  # set by run()

    @property
    def width(self) -> int:
        """Entries per cached token: k, or the most distinct ids a token's draws can give."""
        return self.cfg.top_k if self.cfg.logits == "topk" else min(self.cfg.draws, self.vocab_size)

    # ------------------------------------------------------------------ one batch of rows

    async def _batch(self, rows: list[dict[str, Any]], shard: int) -> tuple[list[dict], dict[str, list[np.ndarray]]]:
        cfg, tok = self.cfg, self.tokenizer
        prompts = [prompt_ids(r, tok) for r in rows]
        topk_now = self.need_logits and cfg.logits == "topk" and cfg.mode == "completions"
        records = []
        if cfg.mode == "completions":
            comps = await self.teacher.complete(prompts, self.sampling, cfg.top_k if topk_now else 0)
            completions = [c.ids for c in comps]
            for row, c in zip(rows, comps, strict=True):
                records.append(row | {"completion": c.text, "token_ids": c.ids})
        else:
            asks = [rewrite_prompt(r, cfg.self_distill, tok) for r in rows]
            comps = await self.teacher.complete(asks, self.sampling, 0)
            completions = []
            for row, c in zip(rows, comps, strict=True):
                ok = accept_rewrite(c.text, row["answer"], cfg.self_distill)
                ids = c.ids if ok else answer_ids(row["answer"], cfg, tok)
                completions.append(ids)
                records.append(row | {"completion": tok.decode(ids), "token_ids": ids, "rewritten": ok,
                                      "rewrite": c.text})  # fmt: skip
        arrays: dict[str, list[np.ndarray]] = {}
        if self.need_logits:
            seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
            starts = [len(p) for p in prompts]
            if topk_now:
                arrays["ids"] = [c.top_ids for c in comps]
                arrays["logprobs"] = [c.top_logprobs for c in comps]
            elif cfg.logits == "topk":
                scored = await self.teacher.score(seqs, starts, cfg.top_k)
                arrays["ids"], arrays["logprobs"] = [s[0] for s in scored], [s[1] for s in scored]
            else:
                # A seed per shard: a redone shard draws the same ids (transformers; vLLM takes no seed).
                drawn = await self.teacher.sample(seqs, starts, cfg.draws, cfg.seed * 100_003 + shard)
                packed = [unique_counts(i, lp, self.width) for i, lp in drawn]
                arrays["ids"] = [p[0] for p in packed]
                arrays["logprobs"] = [p[1] for p in packed]
                arrays["counts"] = [p[2] for p in packed]
        for rec in records:
            rec["n_tokens"] = len(rec["token_ids"])
        return records, arrays

    async def _shard(self, i: int) -> None:
        cfg = self.cfg
        rows = self.rows[i * cfg.shard_size : (i + 1) * cfg.shard_size]
        step = cfg.prompts_per_request
        parts = await asyncio.gather(*(self._batch(rows[j : j + step], i) for j in range(0, len(rows), step)))
        records = [r for recs, _ in parts for r in recs]
        arrays = {}
        if self.need_logits:
            dtypes = {"ids": np.int32, "logprobs": np.float32, "counts": np.uint16}
            for name in parts[0][1]:
                pieces = [a.astype(dtypes[name]) for _, arrs in parts for a in arrs[name]]
                arrays[name] = _concat(pieces, self.width, dtypes[name])
        write_shard(_shard_dir(self.work, i), records, arrays)
        self._tick(f"shard {i + 1}/{self.n_shards}")

    def _tick(self, message: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        if self.progress:
            self.progress(self.done / self.n_shards, message)

    async def _all(self, pending: list[int]) -> None:
        # Enough shards in flight to keep every request slot busy, and no more (memory).
        slots = asyncio.Semaphore(max(2, math.ceil(self.cfg.concurrency * self.cfg.prompts_per_request
                                                   / self.cfg.shard_size) + 1))  # fmt: skip

        async def one(i: int) -> None:
            async with slots:
                await self._shard(i)

        try:
            await asyncio.gather(*(one(i) for i in pending))
        finally:
            close = getattr(self.teacher, "aclose", None)
            if close is not None:
                await close()

    # ------------------------------------------------------------------ the whole run

    def run(
        self, data_dir: Path, logits_dir: Path, vocab_size: int, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Generate every missing shard, then merge all shards into ``data_dir`` and ``logits_dir``.

        ``progress(fraction, message)`` is called as shards finish (and once on resuming).
        """
        t0 = time.time()
        self.vocab_size = vocab_size
        self.progress = progress
        pending = self.pending
        if self.progress and self.resumed:
            self.progress(self.done / self.n_shards, f"resuming: {self.resumed}/{self.n_shards} shards on disk")
        if pending:
            # A terminal bar for interactive runs (tqdm turns itself off when stderr is not a TTY).
            with tqdm(total=self.n_shards, initial=self.resumed, desc="generate", unit="shard", disable=None) as bar:
                self._bar = bar
                try:
                    asyncio.run(self._all(pending))
                finally:
                    self._bar = None
        stats = self.merge(Path(data_dir), Path(logits_dir), vocab_size)
        shutil.rmtree(self.work.parent, ignore_errors=True)  # merged: the shards have done their job
        seconds = time.time() - t0
        return stats | {
            "seconds": round(seconds, 2),
            "tokens_per_s": round(stats["tokens"] / seconds, 1) if seconds else None,
            "shards": self.n_shards,
            "shards_resumed": self.resumed,
        }

    def merge(self, data_dir: Path, logits_dir: Path, vocab_size: int) -> dict[str, Any]:
        """All shards, in order, into ``train.jsonl`` and the logit cache; every id exactly once."""
        shutil.rmtree(logits_dir, ignore_errors=True)
        logits_dir.mkdir(parents=True)
        kind = "topk" if self.cfg.logits == "topk" else "sampled"
        writer = CacheWriter(logits_dir, kind, self.width, vocab_size, {"draws": self.cfg.draws} if kind == "sampled"
                             else {}) if self.need_logits else None  # fmt: skip
        out_rows, offset = [], 0
        for i in range(self.n_shards):
            shard = _shard_dir(self.work, i)
            records = read_jsonl(shard / "rows.jsonl")
            arrays = {p.stem: np.load(p) for p in shard.glob("*.npy")}
            if writer is not None:
                n = sum(r["n_tokens"] for r in records)
                if len(arrays.get("ids", ())) != n:
                    raise RuntimeError(f"{shard}: {len(arrays.get('ids', ()))} cached tokens for {n} completion tokens")
                writer.append(arrays["ids"], arrays["logprobs"], counts=arrays.get("counts"))
            for r in records:
                out_rows.append(r | {"offset": offset})
                offset += r["n_tokens"]
        got = [str(r["id"]) for r in out_rows]
        want = [str(r["id"]) for r in self.rows]
        if got != want:
            missing, extra = set(want) - set(got), len(got) - len(set(got))
            raise RuntimeError(f"generate: shards do not hold every row once ({len(missing)} missing, {extra} twice)")
        meta = writer.close(rows=len(out_rows)) if writer is not None else None
        write_jsonl(out_rows, data_dir / "train.jsonl")
        with_answer = [r for r in out_rows if isinstance(r.get("answer"), str)]
        stats: dict[str, Any] = {
            "rows": len(out_rows),
            "tokens": offset,
            "teacher_train_exact_match": (
                sum(r["completion"].strip() == r["answer"].strip() for r in with_answer) / len(with_answer)
                if with_answer and self.cfg.mode == "completions"
                else None
            ),
            "cache": None,
        }
        if self.cfg.mode == "self_distill":
            stats["rewrites_accepted"] = sum(r["rewritten"] for r in out_rows)
            stats["acceptance_rate"] = stats["rewrites_accepted"] / len(out_rows) if out_rows else None
        if meta is not None:
            size = sum((logits_dir / a["file"]).stat().st_size for a in meta["arrays"].values())
            stats["cache"] = {"kind": kind, "k": self.width, "bytes": size,
                              "bytes_per_token": round(size / offset, 1) if offset else None}  # fmt: skip
        return stats
