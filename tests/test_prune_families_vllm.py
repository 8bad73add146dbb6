"""Every supported family, width- and depth-pruned, is read by vLLM as transformers reads it.

A random model per family (hidden 128, 4 heads of 32, 2 KV heads) is pruned with ``method: both``
to half its parameters, then decoded greedily by transformers and by vLLM's engine (one process
for all families, ``tests/vllm_greedy.py``). A checkpoint whose head_dim vLLM derives differently
(Qwen2 takes hidden_size // heads) fails here: vLLM refuses it or decodes other tokens.
"""

import json
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.config import PruneConfig
from compress.models import load_model, load_tokenizer
from compress.prune.families import FAMILIES
from compress.prune.prune import prune_model, standalone_job
from tests.conftest import ROOT, VLLM_PYTHON, require_vllm
from tests.test_prune import CONFIGS, HD, _texts

pytestmark = pytest.mark.slow

MAX_TOKENS = 6


def _teacher(family: str, out, tok):
    """A random ``family`` model over the tiny teacher's vocabulary, saved with that tokenizer."""
    kw = dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, max_position_embeddings=128, initializer_range=0.2,
    )  # fmt: skip
    if family != "phi3":
        kw["head_dim"] = HD
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](**kw), dtype=torch.float32).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _greedy(model_dir, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens from transformers, EOS included (``generate`` would stop at it or, with a minimum, mask it)."""
    model = load_model(model_dir).eval()
    outs = []
    for p in prompts:
        ids = list(p)
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        outs.append(ids[len(p) :])
    return outs


def test_vllm_decodes_every_width_pruned_family_as_transformers_does(tmp_path):
    require_vllm()
    tok = load_tokenizer(ROOT / "assets" / "teacher-tiny")
    texts = _texts()
    prompts = [tok(t[:12], add_special_tokens=False)["input_ids"] for t in texts[:6]]
    cfg = PruneConfig(method="both", target_ratio=0.4, batch_size=8)
    jobs, want, shapes = [], {}, {}
    for family in sorted(FAMILIES):
        teacher = _teacher(family, tmp_path / family / "teacher", tok)
        out = tmp_path / family / "pruned"
        rec = prune_model(standalone_job(teacher, texts, cfg, out), log=lambda _: None)
        shapes[family] = rec["student_shape"]
        s = rec["student_shape"]
        assert s["num_layers"] < 4 and (s["hidden_size"] < 128 or s["intermediate_size"] < 256), (family, s)
        want[str(out)] = _greedy(out, prompts)
        jobs.append({"model": str(out), "prompts": prompts, "max_tokens": MAX_TOKENS})
    (tmp_path / "job.json").write_text(json.dumps(jobs))
    # The engine in-process (no engine-core child): six engine starts in one minute, not four.
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    script = ROOT / "tests" / "vllm_greedy.py"
    subprocess.run(
        [str(VLLM_PYTHON), str(script), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
        check=True, timeout=900, env={**env, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    got = {r["model"]: r for r in json.loads((tmp_path / "out.json").read_text())}
    failures = []
    for family in sorted(FAMILIES):
        key = str(tmp_path / family / "pruned")
        r = got[key]
        if "error" in r:
            failures.append(f"{family} {shapes[family]}: vLLM refused it: {r['error']}")
        elif r["ids"] != want[key]:
            failures.append(f"{family} {shapes[family]}: vLLM {r['ids']} != transformers {want[key]}")
    assert not failures, "\n".join(failures)
