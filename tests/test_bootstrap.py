"""A short real bootstrap: tokenizer + tiny Llama trained on the task world, then cached by hash."""

import pytest

from compress.bootstrap import greedy_exact_match, read_manifest
from compress.config import BootstrapConfig
from compress.data.taskworld import make_splits
from compress.models import load_model, load_tokenizer

pytestmark = pytest.mark.slow


def _cfg(tmp_path, steps=150, min_em=0.0):
    return BootstrapConfig.model_validate(
        {
            "out_dir": str(tmp_path / "teacher"),
            "taskworld": {"tasks": ["max"], "n_train": 800, "n_heldout": 50, "seed": 1},
            "arch": {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "intermediate_size": 128,
            },
            "train": {"max_steps": steps, "batch_size": 32, "learning_rate": 0.003},
            "min_heldout_exact_match": min_em,
        }
    )


def test_short_bootstrap_learns_and_is_cached(tmp_path, prefect_home):
    from flows.bootstrap import bootstrap_teacher_flow

    cfg = _cfg(tmp_path)
    first = bootstrap_teacher_flow(cfg)
    assert first["cached"] is False
    manifest = read_manifest(cfg.out_dir)
    assert manifest["config_hash"] == first["config_hash"] and manifest["sha256"]
    # 150 steps on one easy task is far better than chance (1 in 10 digits).
    model, tok = load_model(cfg.out_dir), load_tokenizer(cfg.out_dir)
    _, heldout = make_splits(["max"], 800, 50, seed=1)
    em = greedy_exact_match(model, tok, heldout)
    assert em == pytest.approx(manifest["heldout_exact_match"])
    assert em >= 0.5
    second = bootstrap_teacher_flow(cfg)
    assert second["cached"] is True


def test_bootstrap_fails_below_threshold(tmp_path):
    from compress.bootstrap import bootstrap_teacher

    with pytest.raises(RuntimeError, match="below min_heldout_exact_match"):
        bootstrap_teacher(_cfg(tmp_path, steps=2, min_em=0.99))
    assert read_manifest(tmp_path / "teacher") is None
