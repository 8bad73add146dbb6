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


def test_a_second_phase_continues_from_the_first_with_language(tmp_path):
    """``init_from``: phase 2 starts from phase 1's weights (its hash depends on them), on a world with
    the language; the manifest carries the language NLL beside its exact floor, and a failed gate keeps
    the per-task scores in a file the cache check does not read."""
    from compress.bootstrap import bootstrap_teacher, teacher_hash

    world = {"tasks": ["max", "lang"], "n_train": 800, "n_heldout": 40, "seed": 1}
    first = _cfg(tmp_path / "p1").model_copy(update={"taskworld": BootstrapConfig().taskworld.model_validate(world)})
    m1 = bootstrap_teacher(first)
    assert set(m1["heldout_exact_match_by_task"]) == {"max"}
    lang = m1["language"]
    assert lang["floor_texts"] == 20 and 0 < lang["floor_entropy"] <= lang["nll"]
    second = first.model_copy(update={"out_dir": tmp_path / "p2", "init_from": first.out_dir})
    assert teacher_hash(second) != teacher_hash(first)
    m2 = bootstrap_teacher(second.model_copy(update={"train": second.train.model_copy(update={"max_steps": 50})}))
    # Trained on from phase 1, not from scratch: at least as good on the language after 50 more steps.
    assert m2["language"]["nll"] <= lang["nll"] + 0.05
    with pytest.raises(ValueError, match="hidden_size"):
        bootstrap_teacher(second.model_copy(update={"arch": second.arch.model_copy(update={"hidden_size": 32})}))
    hopeless = _cfg(tmp_path / "p3", steps=2, min_em=0.99)
    with pytest.raises(RuntimeError, match="below"):
        bootstrap_teacher(hopeless)
    assert (hopeless.out_dir / "teacher_manifest.failed.json").is_file() and read_manifest(hopeless.out_dir) is None
