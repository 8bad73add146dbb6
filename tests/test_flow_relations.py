"""The relations the demo exists to show, on the demo's own teacher at a small budget, through the whole flow.

The end-to-end test (tests/test_flow_e2e.py) checks the flow's mechanics on a random teacher; this one
checks its results on the trained demo teacher (``configs/tiny.yaml``) with 600 prompts and 120
steps per arm (about 80 s on 2 cores): training recovers what pruning lost, for both arms, and KD
keeps the language where SFT on the teacher's greedy answers forgets it. Measured at these
settings: pruned 0.4625, SFT 0.7275, KD 0.73; language bits per byte KD 2.44, SFT 4.75, so the
margins asserted are a fraction of what was seen.
"""

import pytest

from compress.config import load_config
from compress.integrity import verify_run
from tests.conftest import ROOT, VLLM_PYTHON, require_vllm

pytestmark = pytest.mark.slow

SMALL = [
    "name=relations",
    "taskworld.n_train=600",
    "taskworld.n_heldout=500",
    "distill.train.max_steps=120",
    "distill.train.batch_size=32",
    "distill.teacher_source=cached",
    "distill.hidden_weight=0",
    "evaluate.gates=[]",
]


def test_training_recovers_and_kd_keeps_the_language(tmp_path, prefect_home):
    require_vllm()
    from flows.compress import compress_pipeline

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", [*SMALL, f"runs_dir={tmp_path}", f"generate.vllm_python={VLLM_PYTHON}"]
    )
    models = compress_pipeline(cfg).summary["models"]
    score = {name: m["score"] for name, m in models.items()}
    bpb = {name: m["scores"]["language"]["bits_per_byte"]["value"] for name, m in models.items()}
    assert score["teacher"] > 0.9, score  # the demo teacher, as trained
    assert score["pruned"] < 0.6 * score["teacher"], score  # pruning costs something
    assert score["student"] > score["pruned"] + 0.15, score  # KD recovers
    assert score["sft"] > score["pruned"] + 0.15, score  # so does SFT, on the same data
    assert bpb["student"] < 0.75 * bpb["sft"], bpb  # KD keeps the language, SFT forgets it
    assert bpb["student"] < bpb["pruned"] * 1.1, bpb

    # Nothing lost: every output file the manifest lists is there, with its size and sha256; a
    # truncated checkpoint is named.
    run = tmp_path / "relations"
    checked, problems = verify_run(run)
    assert checked > 20 and problems == [], problems
    weights = run / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _, problems = verify_run(run)
    assert len(problems) == 1 and "student/model.safetensors: 1000 bytes" in problems[0], problems
