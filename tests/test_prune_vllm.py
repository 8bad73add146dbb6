"""A depth+width-pruned checkpoint is served by the real vLLM server, and decodes as transformers does."""

import httpx
import pytest
import torch

from compress.config import PruneConfig, TaskWorldConfig
from compress.data.taskworld import make_splits
from compress.generate.teacher import parse_choice
from compress.models import load_model, load_tokenizer
from compress.prune.prune import prune_model, standalone_job
from compress.serving.vllm_server import ServerSpec, VLLMServer
from tests.conftest import ROOT, VLLM_PYTHON, require_vllm

pytestmark = pytest.mark.slow


def test_vllm_serves_a_depth_and_width_pruned_checkpoint(tmp_path):
    require_vllm()
    world = TaskWorldConfig()
    train, heldout = make_splits(world.tasks, 64, 8, world.seed)
    # Every axis at once, with head_dim (32) no longer hidden // heads: vLLM must read it from config.json.
    cfg = PruneConfig(
        method="both", num_layers=6, hidden_size=96, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1
    )
    texts = [r["prompt"] + r["answer"] + "\n" for r in train]
    rec = prune_model(
        standalone_job(ROOT / "assets" / "teacher-tiny", texts, cfg, tmp_path / "pruned"), log=lambda _: None
    )
    assert rec["student_shape"] == {
        "num_layers": 6,
        "hidden_size": 96,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    prompts = [r["prompt"] for r in heldout]
    assert len(prompts) >= 5

    model, tok = load_model(tmp_path / "pruned").eval(), load_tokenizer(tmp_path / "pruned")
    want = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        want.append(out[0, ids.shape[1] :].tolist())

    spec = ServerSpec(model_dir=tmp_path / "pruned", python=VLLM_PYTHON, dtype="float32", max_model_len=128)
    server = VLLMServer(spec, tmp_path / "vllm.log")
    got = []
    with server:
        for p in prompts:
            prompt_ids = tok(p, add_special_tokens=False)["input_ids"]
            r = httpx.post(
                f"{server.base_url}/v1/completions",
                json={
                    "model": server.served_name,
                    "prompt": prompt_ids,
                    "max_tokens": 8,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "logprobs": 1,
                    "return_tokens_as_token_ids": True,
                    "skip_special_tokens": False,
                },
                timeout=60,
                headers=server.headers,
            )
            r.raise_for_status()
            got.append(parse_choice(r.json()["choices"][0], 1).ids)
    # transformers stops at EOS; vLLM was told to go on: compare up to transformers' length.
    for p, g, w in zip(prompts, got, want, strict=True):
        assert g[: len(w)] == w, (p, tok.decode(g), tok.decode(w))
