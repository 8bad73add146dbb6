"""Pruning: depth and width surgery on every supported family, shapes, importance, selection baselines."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from compress.config import PruneConfig
from compress.data.taskworld import make_splits
from compress.models import checkpoint_params, count_params, load_model, load_tokenizer
from compress.prune.families import FAMILIES, UnsupportedArchitecture, family_of
from compress.prune.importance import Calibration, block_influence, calibration_loss
from compress.prune.params import ConfigView, formula_params, meta_params
from compress.prune.plan import plan_shape
from compress.prune.prune import prune_model, standalone_job
from compress.prune.shape import Shape, check_shape, choose_shape, config_for, shape_of
from compress.prune.surgery import Keep, build_pruned

HD = 32  # head_dim: vLLM's CPU attention needs >= 32
CONFIGS = {
    "llama": T.LlamaConfig,
    "mistral": T.MistralConfig,
    "qwen2": T.Qwen2Config,
    "qwen3": T.Qwen3Config,
    "gemma2": T.Gemma2Config,
    "phi3": T.Phi3Config,
}


def _texts(n=16):
    train, _ = make_splits(["rev", "add"], n, 4, seed=0)
    return [r["prompt"] + r["answer"] + "\n" for r in train]


def _config(family: str, layers: int = 3):
    kw = dict(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family != "phi3":  # Phi-3 has no head_dim field: hidden // heads = 32
        kw["head_dim"] = HD
    if family == "gemma2":
        kw["tie_word_embeddings"] = True  # Gemma's default; the others test untied
    return CONFIGS[family](**kw)


def _model(family: str):
    """A random model whose norms are not all ones (so norm slicing and rescaling are exercised)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


IDS = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _zero(model, axis: str) -> Keep:
    """Silence some units of ``axis`` by zeroing their weights; return the plan that removes them."""
    layers = list(range(3))
    keep = Keep(layers=layers)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            o, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
            if axis == "depth" and i == 1:  # both residual branches write nothing: the layer is the identity
                o.zero_()
                down.zero_()
            if axis == "heads" or (axis == "channels" and model.config.model_type == "phi3"):
                # head 0 of each KV group (2 query heads per group)
                o[:, 0:HD] = 0
                o[:, 2 * HD : 3 * HD] = 0
            if axis == "kv":  # every query head of KV group 1
                o[:, 2 * HD :] = 0
            if axis == "neurons":
                down[:, [5, 17]] = 0
        if axis == "channels":
            drop = [7, 9, 40, 100] if model.config.model_type != "phi3" else list(range(64, 128))
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[drop, :] = 0
                layer.mlp.down_proj.weight[drop, :] = 0
            model.model.embed_tokens.weight[:, drop] = 0
            keep.channels = [c for c in range(128) if c not in drop]
    if axis == "depth":
        keep.layers = [0, 2]
    if axis == "heads" or (axis == "channels" and model.config.model_type == "phi3"):
        # Phi-3 keeps hidden = heads x head_dim, so its hidden cut takes heads with it.
        keep.heads, keep.kv_heads = {i: [1, 3] for i in layers}, {i: [0, 1] for i in layers}
    if axis == "kv":
        keep.heads, keep.kv_heads = {i: [0, 1] for i in layers}, {i: [0] for i in layers}
    if axis == "neurons":
        keep.neurons = {i: [j for j in range(96) if j not in (5, 17)] for i in layers}
    return keep


def _combine(model) -> Keep:
    plans = [_zero(model, axis) for axis in ("neurons", "channels", "heads")]
    keep = Keep(layers=[0, 1, 2], neurons=plans[0].neurons, channels=plans[1].channels)
    keep.heads, keep.kv_heads = plans[2].heads, plans[2].kv_heads
    return keep


def _reload(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return loaded.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_prune_keeps_logits(family, tmp_path):
    model = _model(family)
    pruned = _reload(build_pruned(model, family_of(model.config), Keep(layers=[0, 1, 2])), tmp_path)
    torch.testing.assert_close(pruned(IDS).logits, model(IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("axis", ["depth", "heads", "kv", "neurons", "channels", "all"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_silent_units_keeps_logits(family, axis, tmp_path):
    """Removing heads, KV groups, neurons, channels or layers that were zeroed on purpose changes nothing."""
    if family == "phi3" and axis in ("heads", "kv"):
        pytest.skip("Phi-3 has no head_dim field: heads go only with hidden channels (the channels case)")
    model = _model(family)
    keep = _combine(model) if axis == "all" else _zero(model, axis)
    before = model(IDS).logits
    pruned = _reload(build_pruned(model, family_of(model.config), keep), tmp_path)
    assert count_params(pruned) < count_params(model)
    torch.testing.assert_close(pruned(IDS).logits, before, rtol=0, atol=1e-5)
    if keep.heads:  # still a valid grouped-query config
        c = pruned.config
        assert c.num_attention_heads % c.num_key_value_heads == 0
        assert pruned.model.layers[0].self_attn.o_proj.weight.shape[1] == c.num_attention_heads * HD


def test_pruning_live_units_changes_logits(tmp_path):
    """The silent-unit test can fail: removing units that carry signal moves the logits."""
    model = _model("llama")
    keep = Keep(layers=[0, 1, 2], neurons={i: list(range(48)) for i in range(3)})
    pruned = build_pruned(model, family_of(model.config), keep)
    assert (pruned(IDS).logits - model(IDS).logits).abs().max() > 1e-3


def _choose(config, prune_cfg):
    """choose_shape with the model class's own count (the reference the formula is checked against)."""
    fam = family_of(config)
    return choose_shape(config, prune_cfg, fam, lambda shape: meta_params(config, shape, fam))


SHAPES = [Shape(3, 128, 96, 4, 2), Shape(1, 64, 40, 2, 1), Shape(2, 96, 200, 4, 1), Shape(5, 32, 8, 1, 1)]


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True}, {"mlp_bias": True}, {"tie_word_embeddings": True}])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_formula_counts_what_the_model_class_builds(family, extra):
    """The arithmetic count equals the meta-device count of the real class, at the teacher and at pruned shapes,
    from config.json as a dict (the family's class defaults filled in) as from the transformers config."""
    config = _config(family)
    for key, value in extra.items():
        setattr(config, key, value)
    fam = family_of(config)
    view = ConfigView(config.to_diff_dict())  # only what config.json holds: the formula must know the defaults
    for shape in SHAPES:
        if fam.head_dim_derived:
            shape = replace(shape, hidden_size=shape.num_attention_heads * 32)
        want = meta_params(config, shape, fam)
        assert formula_params(view, shape, fam) == want, (shape, extra)
        assert formula_params(config, shape, fam) == want, (shape, extra)


def test_unsupported_architecture_lists_supported():
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=2)
    with pytest.raises(UnsupportedArchitecture, match=r"gpt2.*supported: gemma2, llama, mistral, phi3, qwen2, qwen3"):
        family_of(cfg)


@pytest.mark.parametrize(
    ("method", "ratio"), [("depth", 0.5), ("width", 0.5), ("both", 0.5), ("width", 0.7), ("both", 0.3)]
)
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_target_ratio_picks_a_valid_shape_near_the_budget(family, method, ratio):
    config = _config(family, layers=8)
    fam = family_of(config)
    shape, params, teacher = _choose(config, PruneConfig(method=method, target_ratio=ratio))
    check_shape(config, shape, fam)
    t = shape_of(config)
    if method == "depth":
        assert (shape.hidden_size, shape.intermediate_size) == (t.hidden_size, t.intermediate_size)
    if method == "width":
        assert shape.num_layers == t.num_layers
        assert (shape.hidden_size, shape.intermediate_size) != (t.hidden_size, t.intermediate_size)
    # Within one step of the coarsest axis of the budget.
    assert abs(params / teacher - ratio) < 0.15, (shape, params / teacher)
    built = AutoModelForCausalLM.from_config(config_for(config, shape, fam))
    assert count_params(built) == params


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"method": "width", "num_attention_heads": 3}, "multiple of num_key_value_heads=2"),
        ({"method": "width", "hidden_size": 98}, "hidden_size=98 must be a multiple of num_attention_heads=4"),
        ({"method": "width", "intermediate_size": 500}, "intermediate_size=500 must be between 1 and"),
        ({"method": "width", "num_attention_heads": 4, "num_key_value_heads": 1}, "4 query heads per KV group"),
    ],
)
def test_invalid_explicit_shapes_name_the_field(sizes, message):
    config = _config("llama")
    with pytest.raises(ValueError, match=message):
        _choose(config, PruneConfig(**sizes))


@pytest.mark.parametrize("family", ["phi3", "qwen2"])
def test_hidden_follows_heads_where_a_loader_derives_head_dim(family):
    """Phi-3 (transformers) and Qwen2 (vLLM) read head_dim as hidden // heads: the hidden size moves in whole heads."""
    config = _config(family)
    with pytest.raises(ValueError, match=f"prune.hidden_size=64: {family} checkpoints are read with head_dim"):
        _choose(config, PruneConfig(method="width", hidden_size=64))
    for sizes in ({"method": "width", "target_ratio": 0.6}, {"method": "both", "target_ratio": 0.5}):
        shape, _, _ = _choose(config, PruneConfig(**sizes))
        assert shape.hidden_size == shape.num_attention_heads * 32, sizes


def test_block_influence_detects_identity_layer(tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    layer = model.model.layers[2]
    with torch.no_grad():  # layer 2 becomes the identity, so BI = 0
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    scores = block_influence(model, Calibration(tok, _texts(), batch_size=5))
    assert len(scores) == 4
    assert abs(scores[2]) < 1e-5
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-4


def test_skipping_a_layer_is_dropping_it(tiny_model_dir, tmp_path):
    """loss_increase's skipped-layer loss equals the loss of the checkpoint with that layer removed."""
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    skipped = calibration_loss(model, Calibration(tok, _texts()), skip=1)
    dropped = build_pruned(model, family_of(model.config), Keep(layers=[0, 2, 3]))
    assert abs(calibration_loss(dropped, Calibration(tok, _texts())) - skipped) < 1e-5


def test_prune_model_both_axes_and_importance_reuse(tiny_model_dir, tmp_path):
    cfg = PruneConfig(method="both", target_ratio=0.5, depth_metric="loss_increase", batch_size=5)
    rec = prune_model(standalone_job(tiny_model_dir, _texts(), cfg, tmp_path / "pruned"))
    planned = plan_shape(tiny_model_dir, cfg)
    assert rec["params_after"] == planned["params_after"] == checkpoint_params(tmp_path / "pruned")
    assert rec["student_shape"] == planned["student"]
    assert rec["params_after"] < rec["params_before"] and not rec["importance_reused"]
    assert rec["calibration_loss_after"] > 0 and rec["calibration_loss_before"] > 0
    scores = json.loads((tmp_path / "importance.json").read_text())
    assert len(scores["loss_increase"]) == 4 and len(scores["heads"][0]) == 2 and len(scores["channels"]) == 64
    assert (tmp_path / "plots" / "importance.png").stat().st_size > 0
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not any(info.values())
    assert load_tokenizer(tmp_path / "pruned")("rev ab=")["input_ids"]
    # Another size on the same teacher and texts: the scores are reused, not measured again.
    rec2 = prune_model(
        standalone_job(tiny_model_dir, _texts(), cfg.model_copy(update={"target_ratio": 0.7}), tmp_path / "pruned")
    )
    assert rec2["importance_reused"] and rec2["params_after"] > rec["params_after"]
    # Other calibration texts: measured again.
    rec3 = prune_model(standalone_job(tiny_model_dir, _texts(8), cfg, tmp_path / "pruned"))
    assert not rec3["importance_reused"]


def test_calibration_file_rows_and_a_row_without_text(tmp_path):
    from compress.jsonl import write_jsonl
    from compress.prune.prune import read_calibration

    path = write_jsonl([{"text": "ab", "completion_start": 1}, {"text": "cd"}], tmp_path / "calibration.jsonl")
    assert read_calibration(path) == (["ab", "cd"], [1, 0])
    write_jsonl([{"text": "ab"}, {"prompt": "cd"}], path)
    with pytest.raises(ValueError, match=r"calibration\.jsonl: row 1 has no 'text' field"):
        read_calibration(path)


def test_importance_beats_baselines_on_the_easy_teacher(tmp_path):
    """At the same parameter budget, importance-chosen units give the lowest calibration loss."""
    from compress.config import TaskWorldConfig

    world = TaskWorldConfig()
    train, _ = make_splits(world.tasks, 128, world.n_heldout, world.seed)
    texts = [r["prompt"] + r["answer"] + "\n" for r in train]
    starts = [len(r["prompt"]) for r in train]  # the loss is on the answers (the prompts are random strings)
    losses = {}
    for how, seed in [("importance", 0), ("last_layers", 0), ("random", 0), ("random", 1), ("random", 2)]:
        cfg = PruneConfig(method="both", target_ratio=0.5, selection=how, seed=seed)
        rec = prune_model(
            standalone_job("assets/teacher-tiny", texts, cfg, tmp_path / f"{how}{seed}" / "pruned", starts)
        )
        losses[f"{how}{seed}"] = rec["calibration_loss_after"]
    print(json.dumps(losses, indent=1))
    best = losses.pop("importance0")
    assert all(best < other for other in losses.values()), (best, losses)


def test_plan_shape_needs_no_torch(tiny_model_dir):
    """The student's size comes from config.json and the safetensors headers: no torch, no transformers."""
    code = (
        "import sys; from compress.config import PruneConfig; from compress.prune.plan import plan_shape; "
        f"r = plan_shape({str(tiny_model_dir)!r}, PruneConfig(method='both', target_ratio=0.5)); "
        "print(r['params_after'], 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"], out
    assert int(out[0]) == plan_shape(tiny_model_dir, PruneConfig(method="both", target_ratio=0.5))["params_after"]


def test_counter_falls_back_to_the_model_class_when_the_formula_misses_the_checkpoint(tiny_model_dir):
    from compress.prune.params import counter_for

    config = ConfigView(json.loads((tiny_model_dir / "config.json").read_text()))
    fam = family_of(config)
    shape = replace(shape_of(config), num_layers=2, intermediate_size=64)
    real = T.AutoConfig.from_pretrained(tiny_model_dir)
    # A teacher the formula does not reproduce (one parameter off): the class's own count is used.
    wrong = formula_params(config, shape_of(config), fam) + 1
    assert counter_for(config, fam, wrong, tiny_model_dir, False)(shape) == meta_params(real, shape, fam)
    assert counter_for(config, fam, None, tiny_model_dir, False)(shape) == formula_params(config, shape, fam)
