"""A bring-your-own setup that is not the task world, built entirely inside a test.

- a BPE tokenizer trained here with ``tokenizers`` (Qwen2's pre-tokenizer, so that transformers,
  which reloads it as ``Qwen2Tokenizer``, encodes exactly as trained), with a ChatML chat template;
- a tiny random Qwen2 model (head_dim 32: vLLM's CPU attention refuses 16);
- a local JSONL of OpenAI-style ``messages`` records, with one duplicate and one record that is
  also an evaluation prompt (both must be dropped from training);
- two local lm-eval tasks: ``byo_gen`` (generate_until, exact match) and ``byo_mc``
  (multiple_choice, accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "four"]


def questions(n: int, offset: int = 0) -> list[tuple[str, str]]:
    """Deterministic (question, answer) pairs: 'what comes after X Y?' -> 'Y X'."""
    out = []
    for i in range(offset, offset + n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        out.append((f"what comes after {a} {b} {i}?", f"{b} {a}"))
    return out


def build_tokenizer(corpus: list[str], vocab_size: int = 320):
    """A byte-level BPE trained on ``corpus``, with Qwen2's pre-tokenizer and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_qwen2(tokenizer, out_dir: Path, layers: int = 4) -> Path:
    """A random Qwen2 checkpoint with ``tokenizer``, saved to ``out_dir``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_world(root: Path) -> dict[str, Path]:
    """Teacher, chat data and two local lm-eval tasks under ``root``; returns their paths."""
    train = questions(40)
    heldout = questions(8, offset=100)
    corpus = [f"{q} {a}" for q, a in train + heldout] + ["A B C D answer: question"]
    tok = build_tokenizer(corpus)
    teacher = build_qwen2(tok, root / "teacher")

    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in train]
    records.append(records[0])  # a duplicate prompt
    q, a = heldout[0]
    records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})  # eval overlap
    chat = write_jsonl(records, root / "data" / "chat.jsonl")

    tasks = root / "tasks"
    gen_data = write_jsonl([{"question": q, "answer": a} for q, a in heldout], tasks / "gen.jsonl")
    mc_rows = [{"question": q, "choices": [a, "red red", "dog cat"], "label": 0} for q, a in heldout]
    mc_data = write_jsonl(mc_rows, tasks / "mc.jsonl")
    gen_task = {
        "task": "byo_gen",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(gen_data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["<|im_end|>", "\n"], "do_sample": False, "max_gen_toks": 8},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    mc_task = {
        "task": "byo_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(mc_data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (tasks / "byo_gen.yaml").write_text(yaml.safe_dump(gen_task, sort_keys=False))
    (tasks / "byo_mc.yaml").write_text(yaml.safe_dump(mc_task, sort_keys=False))
    return {"teacher": teacher, "chat": chat, "tasks": tasks}


def pipeline_config(root: Path, world: dict[str, Path], vllm_python: Path) -> dict:
    """A pipeline config for the world: messages data, both local tasks, a 2-layer student."""
    return {
        "name": "byo",
        "runs_dir": str(root / "runs"),
        "device": "auto",
        "teacher": {"path": str(world["teacher"]), "dtype": "float32"},
        "data": {
            "sources": [{"path": "json", "data_files": str(world["chat"]), "messages_field": "messages"}],
        },
        "prune": {"num_layers": 2, "calibration_samples": 16, "calibration_seq_len": 64},
        "generate": {
            "vllm_python": str(vllm_python),
            "top_k": 4,
            "max_tokens": 8,
            "stop": [],
            "dtype": "float32",
            "max_model_len": 128,
        },
        "distill": {"train": {"max_steps": 4, "batch_size": 16}},
        "evaluate": {"tasks": ["byo_gen", "byo_mc"], "include_path": str(world["tasks"]), "batch_size": 8},
    }
