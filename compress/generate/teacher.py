"""Teachers behind one interface: a vLLM (OpenAI-compatible) server over HTTP, or transformers in process.

Every call takes token ids and returns token ids, so both backends see exactly the tokens the
student trains on. Three requests cover every mode of the generate stage:

  complete(prompts, k)           greedy or sampled completions; with k > 0 the top-k log-probs of
                                 each generated token (raw distribution, T = 1)
  score(seqs, starts, k)         teacher forcing: the top-k at every position from ``start`` on
                                 (vLLM's ``prompt_logprobs``), for text the teacher did not write
  sample(seqs, starts, draws)    ``draws`` ids drawn from the teacher at every position from
                                 ``start`` on, with log p of each ("Sparse Logit Sampling")

``HTTPTeacher`` speaks vLLM's ``/v1/completions`` with httpx (async, bounded concurrency, retry
with backoff; a 4xx is not retried). ``on_error`` lets a caller that owns the server restart it
before the next attempt. ``HFTeacher`` is the fallback for machines where vLLM cannot run.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

_ID_PREFIX = "token_id:"
NEG_INF = float("-inf")


class GenerationError(RuntimeError):
    """A request to the teacher failed after its retries (transient: the stage may retry)."""


class RequestRejected(RuntimeError):
    """The teacher server refused a request (4xx): a retry cannot help."""


@dataclass
class Sampling:
    """How completions are drawn: ``max_tokens``, ``temperature`` (0 = greedy), ``stop`` strings (kept).

    ``seed`` seeds transformers' sampling; vLLM gets it only with ``request_seed`` (each prompt of a
    request would draw the same random numbers: send one prompt per request then). ``top_p`` is
    nucleus sampling (1 = off).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    top_p: float = 1.0
    request_seed: bool = False


@dataclass
class Completion:
    """One completion: its text and token ids, and (when asked) the ``[n, k]`` top-k per token."""

    text: str
    ids: list[int]
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


Rows = tuple[np.ndarray, np.ndarray]  # ([n, k] ids, [n, k] log-probs)


class Teacher(Protocol):
    """What the generate stage needs from a teacher.

    ``identity`` is the content identity of the model behind it (``compress.jobs.Checkpoint``), ""
    when not known: whoever opens the teacher sets it, and it is part of the shards' fingerprint.
    """

    name: str
    identity: str

    async def complete(self, prompts: list[list[int]], sampling: Sampling, k: int) -> list[Completion]: ...

    async def score(self, seqs: list[list[int]], starts: list[int], k: int) -> list[Rows]: ...

    async def sample(self, seqs: list[list[int]], starts: list[int], draws: int, seed: int) -> list[Rows]: ...


def _top_rows(entries: Sequence[dict[int, float] | None], k: int) -> Rows:
    """``[n, k]`` ids and log-probs, most likely first, from one ``{id: logprob}`` per position.

    vLLM adds the actual token when it is outside the top-k, so a position may carry k + 1 entries:
    keeping the k largest drops it. Fewer than k entries are padded with -inf.
    """
    ids = np.zeros((len(entries), k), dtype=np.int64)
    lps = np.full((len(entries), k), NEG_INF, dtype=np.float32)
    for t, top in enumerate(entries):
        items = sorted(((v, tid) for tid, v in (top or {}).items()), reverse=True)[:k]
        for j, (v, tid) in enumerate(items):
            ids[t, j] = tid
            lps[t, j] = max(v, -9999.0)
    return ids, lps


def _token_id(key: str) -> int:
    if not key.startswith(_ID_PREFIX):
        raise GenerationError(f"expected '{_ID_PREFIX}N' token keys (return_tokens_as_token_ids), got {key!r}")
    return int(key[len(_ID_PREFIX) :])


def parse_choice(choice: dict[str, Any], k: int) -> Completion:
    """A ``/v1/completions`` choice as a ``Completion``: ids from ``token_ids``, top-k from ``logprobs``."""
    lp = choice.get("logprobs")
    ids = choice.get("token_ids")
    if ids is None:
        if not lp:
            raise GenerationError("the server returned neither token_ids nor logprobs (not vLLM?)")
        ids = [_token_id(t) for t in lp["tokens"]]
    if k and lp:
        entries = [{_token_id(key): v for key, v in (top or {}).items()} for top in lp.get("top_logprobs") or []]
        top_ids, top_lps = _top_rows(entries, k)
        return Completion(choice["text"], list(ids), top_ids, top_lps)
    return Completion(choice["text"], list(ids))


OnError = Callable[[BaseException], Awaitable[None]]


class HTTPTeacher:
    """A teacher behind vLLM's OpenAI-compatible API; ``base_url`` is read afresh on every attempt.

    A failed request is tried again ``retries`` times (an attribute: set it on the instance to change it).
    """

    retries: int = 4
    identity: str = ""

    def __init__(
        self,
        base_url: str | Callable[[], str],
        model: str,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout_s: float = 300.0,
        on_error: OnError | None = None,
    ):
        self._base_url = base_url
        self.name = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.concurrency = concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem = asyncio.Semaphore(concurrency)
        self._client: httpx.AsyncClient | None = None
        self.server_restarts = 0  # set by whoever owns the server

    @property
    def base_url(self) -> str:
        url = self._base_url() if callable(self._base_url) else self._base_url
        return url.rstrip("/")

    async def _post(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # asyncio primitives and httpx connections belong to one event loop; each stage run has its own.
            self._loop, self._sem, self._client = loop, asyncio.Semaphore(self.concurrency), None
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
            # No pool limit beyond ours: the semaphore bounds what is in flight.
            self._client = httpx.AsyncClient(timeout=self.timeout_s, headers=headers,
                                             limits=httpx.Limits(max_connections=None))  # fmt: skip
        delay = 1.0
        async with self._sem:
            for attempt in range(self.retries + 1):
                try:
                    r = await self._client.post(f"{self.base_url}/v1/completions", json={"model": self.name, **body})
                    if r.status_code >= 500:
                        raise httpx.HTTPStatusError(f"server error {r.status_code}", request=r.request, response=r)
                    if r.status_code != 200:
                        raise RequestRejected(f"teacher server rejected the request ({r.status_code}): {r.text[:300]}")
                    return sorted(r.json()["choices"], key=lambda c: c["index"])
                except (httpx.TransportError, httpx.HTTPStatusError) as e:
                    if attempt == self.retries:
                        raise GenerationError(f"request failed after {self.retries} retries: {e!r}") from e
                    if self.on_error is not None:
                        await self.on_error(e)
                    # Jitter, so that the requests of a restarted server do not all return at once.
                    await asyncio.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    async def complete(self, prompts: list[list[int]], sampling: Sampling, k: int) -> list[Completion]:
        """Completions of token-id prompts; ``k`` > 0 also returns each token's top-k log-probs."""
        body: dict[str, Any] = {
            "prompt": prompts,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "stop": sampling.stop,
            "include_stop_str_in_output": bool(sampling.stop),
            "skip_special_tokens": False,
            "return_token_ids": True,
            # The model's generation_config would otherwise pick top_p / top_k for us.
            "top_p": sampling.top_p,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
        }
        # No seed by default: vLLM gives every prompt of a request the same seed, which would draw them
        # all with the same random numbers. A caller that sends one prompt per request may ask for it.
        if sampling.request_seed:
            body["seed"] = sampling.seed
        if k:
            body |= {"logprobs": k, "return_tokens_as_token_ids": True}
        choices = await self._post(body)
        if len(choices) != len(prompts):
            raise GenerationError(f"asked for {len(prompts)} completions, got {len(choices)}")
        return [parse_choice(c, k) for c in choices]

    async def score(self, seqs: list[list[int]], starts: list[int], k: int) -> list[Rows]:
        """Top-k at positions ``start..len-1`` of each sequence, by teacher forcing (``prompt_logprobs``)."""
        choices = await self._post({"prompt": seqs, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k})
        if len(choices) != len(seqs):
            raise GenerationError(f"asked to score {len(seqs)} sequences, got {len(choices)}")
        out = []
        for seq, start, c in zip(seqs, starts, choices, strict=True):
            plp = c.get("prompt_logprobs")
            if plp is None or len(plp) != len(seq):
                raise GenerationError("the server returned no prompt_logprobs (vLLM's extension is needed)")
            entries = [{int(tid): d["logprob"] for tid, d in (plp[t] or {}).items()} for t in range(start, len(seq))]
            out.append(_top_rows(entries, k))
        return out

    async def sample(self, seqs: list[list[int]], starts: list[int], draws: int, seed: int) -> list[Rows]:
        """``draws`` ids from the teacher at every position ``start..len-1``, with log p of each.

        One prefix per position, ``n = draws``, one token each: vLLM's prefix cache makes the shared
        prefixes cheap. Sampling is plain (T = 1, no top-p / top-k) so the draws follow p. ``seed`` is
        not sent: vLLM would give every prefix of the request the same random numbers.
        """
        prefixes = [seq[:t] for seq, start in zip(seqs, starts, strict=True) for t in range(start, len(seq))]
        if not prefixes:
            return [(np.zeros((0, draws), np.int64), np.zeros((0, draws), np.float32)) for _ in seqs]
        # No seed (see complete): every prefix must draw with its own random numbers.
        body = {"prompt": prefixes, "max_tokens": 1, "n": draws, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                "min_p": 0.0, "logprobs": 0, "return_tokens_as_token_ids": True,
                "skip_special_tokens": False}  # fmt: skip
        choices = await self._post(body)
        if len(choices) != len(prefixes) * draws:
            raise GenerationError(f"asked for {len(prefixes) * draws} draws, got {len(choices)}")
        ids = np.array([_token_id(c["logprobs"]["tokens"][0]) for c in choices], dtype=np.int64)
        lps = np.array([c["logprobs"]["token_logprobs"][0] for c in choices], dtype=np.float32)
        ids, lps = ids.reshape(-1, draws), lps.reshape(-1, draws)
        out, at = [], 0
        for seq, start in zip(seqs, starts, strict=True):
            n = len(seq) - start
            out.append((ids[at : at + n], lps[at : at + n]))
            at += n
        return out

    async def aclose(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class HFTeacher:
    """The teacher in this process with transformers: the fallback where vLLM cannot run.

    Calls run one at a time in a worker thread (the model is not re-entrant), batched as the caller
    sends them. Completions use ``generate`` with left padding and the raw logits of each step.
    """

    identity: str = ""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
        import torch

        from compress.models import load_model, load_tokenizer

        self.name = str(model_dir)
        self.device = device
        self.model = load_model(Path(model_dir), getattr(torch, dtype), device, trust_remote_code).eval()
        self.tokenizer = load_tokenizer(Path(model_dir), trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a lock belongs to one event loop; each stage run has its own
            self._loop, self._lock = loop, asyncio.Lock()
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    def _batch(self, seqs: list[list[int]], left: bool):
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def _cut(self, new: list[int], stop: list[str]) -> list[int]:
        """The generated ids up to and including the first stop string or EOS (as vLLM returns them)."""
        eos = self.tokenizer.eos_token_id
        if eos in new:
            new = new[: new.index(eos) + 1]
        if not stop or not any(s in self.tokenizer.decode(new) for s in stop):
            return new
        # "The first n tokens hold a stop string" only turns true once: bisect for the shortest such n.
        lo, hi = 1, len(new)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.tokenizer.decode(new[:mid]) for s in stop):
                hi = mid
            else:
                lo = mid + 1
        return new[:lo]

    def _complete(self, prompts: list[list[int]], sampling: Sampling, k: int) -> list[Completion]:
        import torch

        ids, mask = self._batch(prompts, left=True)
        gen: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "pad_token_id": self.pad_id,
                               "output_logits": bool(k), "return_dict_in_generate": True}  # fmt: skip
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
            gen |= {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        else:
            gen |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if sampling.stop:
            gen |= {"stop_strings": sampling.stop, "tokenizer": self.tokenizer}
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **gen)
        new = out.sequences[:, ids.shape[1] :].tolist()
        if k:
            # [steps, B, V] raw logits -> top-k of the log-softmax (the raw distribution, as vLLM's).
            logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
            top_lps, top_ids = logp.topk(k, dim=-1)
        result = []
        for i, row in enumerate(new):
            kept = self._cut(row, sampling.stop)
            c = Completion(self.tokenizer.decode(kept), kept)
            if k:
                c.top_ids = top_ids[i, : len(kept)].cpu().numpy().astype(np.int64)
                c.top_logprobs = top_lps[i, : len(kept)].cpu().numpy()
            result.append(c)
        return result

    def _log_probs(self, seqs: list[list[int]]):
        import torch

        ids, mask = self._batch(seqs, left=False)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        return torch.log_softmax(logits.float(), -1)

    def _score(self, seqs: list[list[int]], starts: list[int], k: int) -> list[Rows]:
        logp = self._log_probs(seqs)
        out = []
        for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            # Position t's distribution is the output at t - 1.
            lps, ids = logp[i, start - 1 : len(seq) - 1].topk(k, dim=-1)
            out.append((ids.cpu().numpy().astype(np.int64), lps.cpu().numpy()))
        return out

    def _sample(self, seqs: list[list[int]], starts: list[int], draws: int, seed: int) -> list[Rows]:
        import torch

        logp = self._log_probs(seqs)
        gen = torch.Generator(device=logp.device).manual_seed(seed)
        out = []
        for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            rows = logp[i, start - 1 : len(seq) - 1]
            ids = torch.multinomial(rows.exp(), draws, replacement=True, generator=gen)
            out.append((ids.cpu().numpy().astype(np.int64), rows.gather(-1, ids).cpu().numpy()))
        return out

    async def complete(self, prompts: list[list[int]], sampling: Sampling, k: int) -> list[Completion]:
        """As ``HTTPTeacher.complete``."""
        return await self._run(self._complete, prompts, sampling, k)

    async def score(self, seqs: list[list[int]], starts: list[int], k: int) -> list[Rows]:
        """As ``HTTPTeacher.score``."""
        return await self._run(self._score, seqs, starts, k)

    async def sample(self, seqs: list[list[int]], starts: list[int], draws: int, seed: int) -> list[Rows]:
        """As ``HTTPTeacher.sample``."""
        return await self._run(self._sample, seqs, starts, draws, seed)

    async def aclose(self) -> None:
        """Nothing to close."""
