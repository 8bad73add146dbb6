"""Training prompts written by the teacher itself (Magpie, Xu et al. 2024): no dataset needed.

An aligned chat model, given only its chat template's opening of a user turn (the *pre-query
template*, e.g. ``<|im_start|>user\\n`` for ChatML), writes a user message: what it was aligned on
looks like that. Each message it writes is a candidate training prompt.

  1. ``pre_query_template`` derives the opening and the end-of-turn from the tokenizer's own chat
     template (any template, not one hard-coded family): it renders a user turn holding a sentinel
     and cuts there.
  2. ``draw_prompts`` samples candidates through a ``Teacher`` (a vLLM server, an endpoint or
     transformers), each with its own seed derived from (source seed, candidate index), so a re-run
     draws the same messages; it stops once ``n + heldout`` messages passed the filters, or after
     ``oversample`` candidates per message wanted.
  3. Filters, in order: unfinished (no end-of-turn within ``max_tokens``), special tokens, too short,
     too long, repetitive (compression ratio), duplicate (after ``normalize``).
  4. The kept messages, shuffled by the seed, are split: the first ``heldout`` are held out for
     evaluation, the rest (up to ``n``) are training rows; the two never share a normalised message.

Reproducibility: with the same teacher and settings a re-draw gives the same messages, exactly so
with transformers, and with vLLM when it serves in float32. In bfloat16 a sequence's logits depend
slightly on what else the server batched with it, and a sampled token can flip: measured on
SmolLM2-135M (CPU, 16 messages of up to 128 tokens), the same requests sent one by one and all at
once gave 7 of 16 identical messages in bfloat16 and 16 of 16 in float32. The pipeline does not
re-draw an unchanged source anyway: the prepare stage is cached by its inputs.

Rows have the format of a ``messages_field`` dataset source (``compress.data.prepare``): the message
rendered as a user turn with ``add_generation_prompt=True``, its ``prompt_ids``, ``answer: None``,
``text`` = the bare message, ``source`` = ``self_instruct``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compress.config import GenerateConfig, SelfInstructSource, first_line
from compress.data.text import normalize
from compress.errors import DataError
from compress.generate.teacher import Completion, HFTeacher, Sampling, Teacher

# Stands for the user message while the template is rendered; no template writes it by itself.
SENTINEL = "SELFINSTRUCTUSERMESSAGE7F3A"
# Why a candidate was dropped, in the order the filters run.
DROP_REASONS = ("unfinished", "special_tokens", "too_short", "too_long", "repetitive", "duplicate")
# Candidates per call with transformers, which seeds a whole batch at once (vLLM: one per request).
HF_BATCH = 32

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class PreQuery:
    """A chat template's opening of a user turn, and the string that ends the turn."""

    text: str  # everything the template writes before the user message (system turn included)
    end: str  # the end-of-turn right after the message (ChatML: <|im_end|>)
    ids: list[int]  # ``text`` as token ids (the template writes BOS itself: no special tokens added)
    specials: tuple[str, ...] = ()  # the tokenizer's special tokens: a message holding one is dropped
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # token ids that end the message (EOS, end)
    eos: str | None = None  # the EOS token's text


def special_tokens(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special tokens (named ones and added tokens marked special), longest first."""
    found = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False) and tok.content:
            found.add(tok.content)
    return tuple(sorted(found, key=lambda t: (-len(t), t)))


def user_turn(message: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation of one user message, after the system turn when one is given."""
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*system, {"role": "user", "content": message}]


def _end_of_turn(after: str, specials: tuple[str, ...], eos: str | None) -> str | None:
    """What ends a user turn, from the text a template writes after the message.

    A special token there is the end (ChatML's ``<|im_end|>``, Llama-3's ``<|eot_id|>``, Zephyr's
    ``</s>``); else the text up to the next newline or special token (Llama-2's ``[/INST]``); a
    bare newline (templates that end turns with one); else EOS.
    """
    rest = after.lstrip(" \t")
    for sp in specials:
        if rest.startswith(sp):
            return sp
    cut = min([len(rest), *(i for i in [rest.find("\n"), *(rest.find(sp) for sp in specials)] if i >= 0)])
    head = rest[:cut].strip()
    if head:
        return head
    if rest.startswith("\n"):
        return "\n"
    return eos


def pre_query_template(tokenizer, system_prompt: str | None = None, where: str = "data.sources[0]") -> PreQuery:
    """The pre-query template of the tokenizer's chat template; a one-line ``DataError`` when there is none.

    Renders ``[system?, user=SENTINEL]`` without a generation prompt and cuts before the sentinel,
    so it works for any template (ChatML, Llama-3, Zephyr, Gemma, ...), default system turn included.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: self_instruct needs a chat template (the teacher's tokenizer has none)")
    try:
        rendered = tokenizer.apply_chat_template(
            user_turn(SENTINEL, system_prompt), tokenize=False, add_generation_prompt=False
        )
    except Exception as e:
        msg = f"{where}: self_instruct: the chat template cannot render a user turn: {first_line(e)}"
        raise DataError(msg) from None
    if not isinstance(rendered, str) or rendered.count(SENTINEL) != 1:
        raise DataError(f"{where}: self_instruct: the chat template does not write the user message once as given")
    before, after = rendered.split(SENTINEL)
    specials = special_tokens(tokenizer)
    eos = getattr(tokenizer, "eos_token", None) or None
    end = _end_of_turn(after, specials, eos)
    if not end:
        raise DataError(f"{where}: self_instruct: cannot tell where the template's user turn ends (and no EOS token)")
    if not before:
        raise DataError(f"{where}: self_instruct: the chat template writes nothing before the user message")
    ids = tokenizer(before, add_special_tokens=False)["input_ids"]
    stop_ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    end_ids = tokenizer(end, add_special_tokens=False)["input_ids"]
    if len(end_ids) == 1:
        stop_ids.add(end_ids[0])
    return PreQuery(before, end, list(ids), specials, frozenset(stop_ids), eos)


# ---------------------------------------------------------------------------------------------- filters


def compression_ratio(text: str) -> float:
    """UTF-8 length over raw-DEFLATE length: about 1-2 for prose and code, 3 and more for text that loops.

    The test Whisper runs on sampled text, chosen over counting repeated word n-grams because it sees
    loops at any grain (characters, words, lines) and in text without spaces (code, CJK), with no
    tokenisation. Raw DEFLATE (no zlib header or checksum) so that short messages are judged too:
    ``"ha" * 10`` scores 3.3. Measured here: HumanEval's 164 prompts (median 396 characters) score at
    most 2.82; 300-character pieces of Python's documentation exceed 3.0 in 1.2% of cases (tables).
    The ratio grows with length for any text, so the default threshold (3.0) suits user messages.
    """
    raw = text.encode()
    if not raw:
        return 0.0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # negative wbits: raw DEFLATE stream
    return len(raw) / len(deflate.compress(raw) + deflate.flush())


def user_message(completion: Completion, pq: PreQuery) -> tuple[str, bool]:
    """The user message in a completion (up to the end-of-turn or EOS, stripped), and whether it ended.

    A message that ran into ``max_tokens`` without ending is cut off mid-thought: not finished.
    """
    text = completion.text
    cuts = [i for i in (text.find(pq.end), text.find(pq.eos) if pq.eos else -1) if i >= 0]
    ended = bool(cuts) or bool(completion.ids and completion.ids[-1] in pq.stop_ids)
    return (text[: min(cuts)] if cuts else text).strip(), ended


def drop_reason(message: str, ended: bool, src: SelfInstructSource, pq: PreQuery) -> str | None:
    """Which filter drops a message (``DROP_REASONS``, duplicates aside), or None to keep it."""
    if not ended:
        return "unfinished"
    if any(sp in message for sp in pq.specials):
        return "special_tokens"
    if len(message) < src.min_chars:
        return "too_short"
    if len(message) > src.max_chars:
        return "too_long"
    if compression_ratio(message) > src.max_compression_ratio:
        return "repetitive"
    return None


def split_heldout(messages: list[str], heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(held out, training): the messages in a seeded order, the first ``heldout`` held out.

    The messages must be distinct after ``normalize``; a shared one is a ``ValueError``, since an
    evaluation on prompts the student trained on would measure nothing.
    """
    order = list(messages)
    random.Random(seed).shuffle(order)
    held, train = order[:heldout], order[heldout:]
    shared = {normalize(m) for m in held} & {normalize(m) for m in train}
    if shared:
        raise ValueError(f"held-out and training prompts share {len(shared)} message(s)")
    return held, train


def candidate_seed(seed: int, index: int) -> int:
    """The sampling seed of candidate ``index`` of a source seeded ``seed`` (31 bits, any int seed).

    A hash rather than ``seed + index``, so that sources seeded 0 and 1 do not draw the same
    candidates shifted by one; sha256 is stable across Python and library versions.
    """
    digest = hashlib.sha256(f"self_instruct/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


# ---------------------------------------------------------------------------------------------- drawing


@dataclass
class SelfInstructResult:
    """Training rows, held-out rows and the counts of one self-instruct source."""

    rows: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    report: dict[str, Any]


def self_instruct_sources(cfg) -> list[SelfInstructSource]:
    """The self-instruct sources of a ``DataConfig``."""
    return [s for s in cfg.sources if isinstance(s, SelfInstructSource)]


# Tokens vLLM's scheduler takes per step (its default max_num_batched_tokens with chunked prefill).
SCHEDULER_TOKENS = 2048


def serving_config(gen: GenerateConfig, prompt_tokens: int = 0) -> GenerateConfig:
    """``gen`` for drawing: as many sequences in flight as the generate stage keeps, one per request.

    Each candidate is its own request (its own seed), so the request concurrency is the generate
    stage's requests times its prompts per request, capped so that every prefill of
    ``prompt_tokens`` (the pre-query template) fits one scheduler step beside the running decodes.
    A seeded request whose prefill is split across steps kills vLLM 0.32's CPU engine: it rewinds
    the request's generator (``set_offset``), which a CPU ``torch.Generator`` does not support
    ("CPU Generator does not use offset"); the server is restarted, but the requests in flight are lost.
    """
    in_flight = gen.concurrency * gen.prompts_per_request
    if prompt_tokens:
        in_flight = max(1, min(in_flight, SCHEDULER_TOKENS // (prompt_tokens + 1)))
    return gen.model_copy(update={"concurrency": in_flight})


def render_rows(messages: list[str], tokenizer, system_prompt: str | None, id_prefix: str) -> list[dict[str, Any]]:
    """Rows of user messages, as a ``messages_field`` source renders them (``add_generation_prompt=True``)."""
    rows = []
    for i, message in enumerate(messages):
        prompt = tokenizer.apply_chat_template(
            user_turn(message, system_prompt), tokenize=False, add_generation_prompt=True
        )
        # The template writes BOS and the other specials itself: do not add them twice.
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        rows.append({"id": f"{id_prefix}{i}", "source": "self_instruct", "prompt": prompt, "prompt_ids": ids,
                     "answer": None, "text": message})  # fmt: skip
    return rows


async def _draw(teacher: Teacher, pq: PreQuery, src: SelfInstructSource, start: int, count: int, chunk: int):
    """Candidates ``start .. start + count - 1``, in calls of ``chunk`` (a call's seed: its first candidate's)."""

    def sampling(first: int) -> Sampling:
        return Sampling(src.max_tokens, src.temperature, [pq.end], candidate_seed(src.seed, first), src.top_p,
                        request_seed=True)  # fmt: skip

    calls = [
        teacher.complete([pq.ids] * min(chunk, start + count - j), sampling(j), 0)
        for j in range(start, start + count, chunk)
    ]
    return [c for part in await asyncio.gather(*calls) for c in part]


def draw_prompts(
    src: SelfInstructSource,
    tokenizer,
    teacher: Teacher,
    index: int = 0,
    where: str = "data.sources[0]",
    progress: Progress | None = None,
) -> SelfInstructResult:
    """Draw, filter and split one self-instruct source's prompts through ``teacher``.

    Candidate i is sampled with ``candidate_seed(src.seed, i)``: through vLLM one request per
    candidate, each with its seed; through transformers (``HFTeacher``), which seeds a whole batch,
    in fixed batches of ``HF_BATCH``. Either way a re-run on the same teacher and settings draws the
    same candidates. Waves are sized by the keep rate so far and stop once ``n + heldout`` messages
    are kept, or at ``src.max_draws``. A ``DataError`` when no training prompt is left.
    """
    pq = pre_query_template(tokenizer, src.system_prompt, where)
    chunk = HF_BATCH if isinstance(teacher, HFTeacher) else 1
    wanted, budget = src.wanted, src.max_draws
    drops: Counter[str] = Counter()
    kept: list[str] = []
    seen: set[str] = set()
    t0 = time.perf_counter()

    async def run() -> int:
        drawn = 0
        while len(kept) < wanted and drawn < budget:
            # Guess the wave from the keep rate so far (at worst 1 / oversample); whole chunks keep
            # transformers' batches, and so its draws, the same whatever the waves.
            rate = max(len(kept) / drawn if drawn else 1.0, 1.0 / src.oversample)
            size = math.ceil(math.ceil((wanted - len(kept)) / rate) / chunk) * chunk
            size = min(size, budget - drawn)
            for c in await _draw(teacher, pq, src, drawn, size, chunk):
                message, ended = user_message(c, pq)
                reason = drop_reason(message, ended, src, pq)
                key = normalize(message)
                if reason is None and key in seen:
                    reason = "duplicate"
                if reason:
                    drops[reason] += 1
                    continue
                seen.add(key)
                kept.append(message)
            drawn += size
            if progress:
                progress(min(len(kept) / wanted, 1.0), f"drew {drawn} candidates, kept {len(kept)} of {wanted} wanted")
        return drawn

    drawn = asyncio.run(run())
    seconds = time.perf_counter() - t0
    used = kept[:wanted]  # candidates in index order: which are used does not depend on the waves
    held, train = split_heldout(used, src.heldout, src.seed)
    train = train[: src.n][: src.limit]
    report = {
        "source": src.label,
        "drawn": drawn,
        "max_draws": budget,
        "kept": len(kept),
        "keep_rate": round(len(kept) / drawn, 4) if drawn else 0.0,
        "dropped": {r: drops[r] for r in DROP_REASONS},
        "heldout": len(held),
        "train": len(train),
        "wanted": {"train": src.n, "heldout": src.heldout},
        "seconds": round(seconds, 2),
        "seconds_per_candidate": round(seconds / drawn, 4) if drawn else None,
        "pre_query": pq.text,
        "end_of_turn": pq.end,
    }
    if not train:
        dropped = ", ".join(f"{r} {n}" for r, n in drops.items() if n) or "none dropped"
        raise DataError(
            f"{where}: self_instruct kept {len(kept)} of {drawn} drawn messages ({dropped}): none left for training "
            f"after {len(held)} held out; raise oversample or loosen the filters"
        )
    return SelfInstructResult(
        render_rows(train, tokenizer, src.system_prompt, f"s{index}-"),
        render_rows(held, tokenizer, src.system_prompt, f"s{index}-heldout-"),
        report,
    )


def check_source(src: SelfInstructSource, tokenizer, max_model_len: int, where: str) -> PreQuery:
    """Preflight: a chat template to derive the pre-query from, and room for the message in the server's context."""
    pq = pre_query_template(tokenizer, src.system_prompt, where)
    if len(pq.ids) + src.max_tokens > max_model_len:
        raise DataError(
            f"{where}.max_tokens: the pre-query template ({len(pq.ids)} tokens) + max_tokens ({src.max_tokens}) "
            f"exceed the context the teacher is served with ({max_model_len} tokens, generate.max_model_len)"
        )
    return pq


def describe_source(src: SelfInstructSource, where: str) -> str:
    """One line for ``distillflow plan``."""
    return (
        f"{where}: self-instruct from the teacher's chat template: {src.n} prompts + {src.heldout} held out, "
        f"seed {src.seed} (at most {src.max_draws} draws, T={src.temperature:g})"
    )
