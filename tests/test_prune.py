import json

import pytest
import torch

from compress.config import PruneConfig
from compress.data.taskworld import make_splits
from compress.models import count_params, load_model, load_tokenizer
from compress.prune.depth import drop_layers, layers_to_keep, prune_depth
from compress.prune.importance import block_influence


def _texts(n=16):
    train, _ = make_splits(["rev", "add"], n, 4, seed=0)
    return [r["prompt"] + r["answer"] + "\n" for r in train]


def test_layers_to_keep_picks_highest_in_order():
    assert layers_to_keep([0.1, 0.5, 0.2, 0.9], 2) == [1, 3]
    with pytest.raises(ValueError, match="target_layers"):
        layers_to_keep([0.1], 2)


def test_block_influence_detects_identity_layer(tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    layer = model.model.layers[2]
    # Zero the residual branches' output projections: layer 2 becomes the identity, so BI = 0.
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    scores = block_influence(model, tok, _texts(), batch_size=5)
    assert len(scores) == 4
    assert abs(scores[2]) < 1e-5
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-4


def test_prune_depth_writes_loadable_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    rec = prune_depth(tiny_model_dir, _texts(), PruneConfig(target_layers=2), out)
    assert len(rec["kept_layers"]) == 2 and len(rec["dropped_layers"]) == 2
    pruned = load_model(out)
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    assert rec["params_after"] == count_params(pruned) < rec["params_before"]
    # The kept layers carry the teacher's weights unchanged.
    teacher = load_model(tiny_model_dir)
    for new, old in enumerate(rec["kept_layers"]):
        torch.testing.assert_close(
            pruned.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight
        )
    assert json.loads((tmp_path / "importance.json").read_text())["kept_layers"] == rec["kept_layers"]
    # It generates with a KV cache (layer indices must be consistent).
    tok = load_tokenizer(out)
    enc = tok(["rev ab="], return_tensors="pt", add_special_tokens=False)
    assert pruned.generate(**enc, max_new_tokens=3, do_sample=False).shape[1] == enc["input_ids"].shape[1] + 3


def test_drop_layers_rewrites_layer_types(tiny_model_dir):
    model = load_model(tiny_model_dir)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    drop_layers(model, [1, 2])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]


def test_target_beyond_depth_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        prune_depth(tiny_model_dir, _texts(), PruneConfig(target_layers=9), tmp_path / "p")
