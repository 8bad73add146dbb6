"""Data sources: reading, checking, chat rendering, mixing by weight, dedup and decontamination."""

from __future__ import annotations

import json

import pytest

from compress.config import ConfigError, DataConfig, DatasetSource, TaskWorldConfig, TaskWorldSource, validate
from compress.data.prepare import (
    DataError,
    EvalIndex,
    _quotas,
    check_records,
    load_rows,
    mix_sources,
    prepare_data,
    read_source,
    standalone_job,
)
from compress.data.taskworld import make_splits
from compress.data.tokenizer import build_tokenizer
from compress.jsonl import read_jsonl
from tests.byo_world import CHATML
from tests.byo_world import build_tokenizer as build_bpe


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n, prefix="p", source="s"):
    return [
        {
            "id": f"{prefix}{i}",
            "prompt": f"{prefix} {i}",
            "text": f"{prefix} {i}",
            "answer": None,
            "prompt_ids": [i],
            "source": source,
        }
        for i in range(n)
    ]


def test_quotas_add_up_and_follow_weights():
    assert _quotas(10, [1, 1]) == [5, 5]
    assert _quotas(10, [3, 1]) == [8, 2]  # 7.5 / 2.5: the larger remainder goes first, ties by order
    assert sum(_quotas(7, [1, 1, 1])) == 7


def test_mix_by_weight_dedup_and_decontaminate():
    a = [*_rows(50, "a"), _rows(1, "a")[0]]  # one duplicate
    b = _rows(50, "b")
    cfg = DataConfig(
        sources=[
            DatasetSource(path="x", prompt_field="q", weight=3.0),
            DatasetSource(path="y", prompt_field="q", weight=1.0),
        ],
        num_samples=40,
        seed=1,
    )
    rows, stats = mix_sources([a, b], cfg, EvalIndex(["B 7", "  a   3 "]))
    assert len(rows) == 40
    assert stats[0]["duplicates_dropped"] == 1 and stats[0]["eval_overlap_dropped"] == 1
    assert stats[1]["eval_overlap_dropped"] == 1
    assert stats[0]["used"] == 30 and stats[1]["used"] == 10
    assert len({r["prompt"] for r in rows}) == 40
    assert not {"a 3", "b 7"} & {r["prompt"] for r in rows}
    again, _ = mix_sources([a, b], cfg, EvalIndex(["B 7", "a 3"]))
    assert [r["id"] for r in again] == [r["id"] for r in rows]  # seeded


def test_eval_index_matches_shared_13_gram():
    long_eval = "Question: " + " ".join(f"w{i}" for i in range(20)) + "\nAnswer:"
    idx = EvalIndex([long_eval])
    assert idx.contains(" ".join(f"w{i}" for i in range(3, 16)))  # 13 words in common
    assert not idx.contains(" ".join(f"w{i}" for i in range(3, 15)))  # 12 only
    assert not idx.contains("w1 w2")


def test_weights_without_size_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data: .*num_samples"):
        validate(
            __import__("compress.config", fromlist=["PipelineConfig"]).PipelineConfig,
            {
                "teacher": {"path": "assets/teacher-tiny"},
                "data": {
                    "sources": [
                        {"type": "taskworld", "weight": 2},
                        {"path": "json", "data_files": "x", "prompt_field": "q"},
                    ]
                },
            },
            "c.yaml",
        )


def test_prompt_and_answer_fields_from_jsonl(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"q": "hello", "a": 1}, {"q": "world", "a": "x"}])
    src = DatasetSource(path="json", data_files=str(f), prompt_field="q", answer_field="a")
    tok = build_tokenizer("helowrdx ")
    rows = load_rows(src, 0, TaskWorldConfig(), tok, "data.sources[0]")
    assert [(r["prompt"], r["answer"]) for r in rows] == [("hello", "1"), ("world", "x")]
    assert rows[0]["prompt_ids"] == tok("hello")["input_ids"]


def test_messages_rendered_with_chat_template(tmp_path):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is red"},
        {"role": "assistant", "content": "a colour"},
    ]
    f = _jsonl(tmp_path / "c.jsonl", [{"m": msgs}, {"m": msgs[:2]}])
    src = DatasetSource(path="json", data_files=str(f), messages_field="m")
    tok = build_bpe(["what is red a colour be brief"])
    rows = load_rows(src, 0, TaskWorldConfig(), tok, "data.sources[0]")
    want = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is red<|im_end|>\n<|im_start|>assistant\n"
    assert rows[0]["prompt"] == want and rows[0]["answer"] == "a colour" and rows[0]["text"] == "what is red"
    assert rows[1]["prompt"] == want and rows[1]["answer"] is None
    assert tok.chat_template == CHATML


def test_source_limit_is_a_seeded_sample(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"q": f"p{i}"} for i in range(30)])
    tok = build_tokenizer()
    a = load_rows(
        DatasetSource(path="json", data_files=str(f), prompt_field="q", limit=5, seed=3), 0, TaskWorldConfig(), tok, "w"
    )
    b = load_rows(
        DatasetSource(path="json", data_files=str(f), prompt_field="q", limit=5, seed=3), 0, TaskWorldConfig(), tok, "w"
    )
    assert len(a) == 5 and [r["prompt"] for r in a] == [r["prompt"] for r in b]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_csv_and_parquet_sources(tmp_path, suffix):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]})
    f = tmp_path / f"d.{suffix}"
    ds.to_csv(str(f)) if suffix == "csv" else ds.to_parquet(str(f))
    src = DatasetSource(path=suffix, data_files=str(f), prompt_field="prompt")
    assert [r["prompt"] for r in read_source(src)] == ["a", "b", "c"]
    assert len(read_source(src, head=2)) == 2


def test_local_directory_source(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    _jsonl(d / "train.jsonl", [{"q": "x"}, {"q": "y"}])
    assert [r["q"] for r in read_source(DatasetSource(path=str(d), prompt_field="q"))] == ["x", "y"]


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match=r"data\.sources\[2\]\.data_files: '.*nope\.jsonl': data file not found"):
        src = DatasetSource(path="json", data_files=str(tmp_path / "nope.jsonl"), prompt_field="q")
        read_source(src, where="data.sources[2]")


def test_wrong_split_names_the_source(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"q": "x"}])
    with pytest.raises(DataError, match=r"data\.sources\[0\]: cannot read 'json:.*d\.jsonl' \(split 'test'\)"):
        read_source(
            DatasetSource(path="json", data_files=str(f), prompt_field="q", split="test"), where="data.sources[0]"
        )


def test_prompt_must_be_a_string():
    src = DatasetSource(path="json", data_files="x", prompt_field="q")
    with pytest.raises(DataError, match=r"record 1: 'q' is not a string"):
        check_records(src, [{"q": "ok"}, {"q": 3}], "data.sources[0]")


def test_taskworld_default_is_the_train_split_as_drawn(tiny_model_dir, tmp_path):
    """No data section: the training prompts are the task world's train split, byte for byte, in order."""
    world = TaskWorldConfig(tasks=["rev", "sort", "max"], n_train=300, n_heldout=20)
    heldout = make_splits(world.tasks, world.n_train, world.n_heldout, world.seed)[1]
    job = standalone_job(tiny_model_dir, DataConfig(dedup=False), tmp_path, taskworld=world, calibration_samples=16)
    report = prepare_data(job, [r["prompt"] for r in heldout])
    train, _ = make_splits(world.tasks, world.n_train, world.n_heldout, world.seed)
    rows = read_jsonl(tmp_path / "prompts.jsonl")
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in train]
    assert report["eval_overlap_dropped"] == 0 and report["duplicates_dropped"] == 0
    calib = read_jsonl(tmp_path / "calibration.jsonl")
    assert [c["text"] for c in calib] == [r["prompt"] + r["answer"] + "\n" for r in train[:16]]
    # With dedup on (an explicit data section's default), repeated prompts go.
    update = {"data": DataConfig(), "calibration_source": TaskWorldSource(limit=8), "calibration_samples": 4}
    report = prepare_data(job.model_copy(update=update), [])
    assert report["prompts"] == len({r["prompt"] for r in train})
    assert len(read_jsonl(tmp_path / "calibration.jsonl")) == 4


def test_single_file_as_path(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"q": "x"}, {"q": "y"}])
    assert [r["q"] for r in read_source(DatasetSource(path=str(f), prompt_field="q"))] == ["x", "y"]


def test_directory_skips_marker_files_and_reads_save_to_disk(tmp_path):
    import datasets

    d = tmp_path / "spark"
    d.mkdir()
    datasets.Dataset.from_dict({"q": ["a", "b"]}).to_parquet(str(d / "part-0.parquet"))
    (d / "_SUCCESS").write_text("")
    assert [r["q"] for r in read_source(DatasetSource(path=str(d), prompt_field="q"))] == ["a", "b"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["c"]})}).save_to_disk(str(saved))
    assert [r["q"] for r in read_source(DatasetSource(path=str(saved), prompt_field="q"))] == ["c"]


def test_split_slice_and_head(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"q": f"p{i}"} for i in range(10)])
    src = DatasetSource(path="json", data_files=str(f), prompt_field="q", split="train[:3]")
    assert len(read_source(src)) == 3
    assert len(read_source(src, head=2)) == 2


def test_hub_dataset_data_files_are_not_globbed_locally():
    from compress.data.prepare import is_local, local_files

    src = DatasetSource(path="org/some-dataset", data_files="data/train-*.parquet", prompt_field="q")
    assert not is_local(src) and local_files(src) == []


def test_over_long_prompts_are_dropped_and_counted():
    rows = _rows(5)
    rows[2]["prompt_ids"] = list(range(50))
    cfg = DataConfig(sources=[DatasetSource(path="x", prompt_field="q")])
    out, stats = mix_sources([rows], cfg, None, max_prompt_tokens=10)
    assert len(out) == 4 and stats[0]["too_long_dropped"] == 1
