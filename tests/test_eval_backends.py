"""lm-eval through both backends: in-process ``hf`` and the checkpoint served by a real vLLM server.

The same checkpoint, the same held-out task world (generation, exact match) and a multiple-choice
version of it (log-likelihood, accuracy) must score the same either way. The checkpoint is the
shipped teacher depth-pruned to 4 of its 8 layers, so that it makes mistakes and equal scores
mean something; per-example agreement is checked too, not only the means. A second copy's
tokenizer prepends BOS (as Llama's do): lm-eval's hf model keeps it, so the served path must too.
"""

from __future__ import annotations

import json
import shutil

import pytest

from compress.config import EvaluateConfig, PruneConfig, TaskWorldConfig
from compress.data.taskworld import make_splits, world_splits
from tests.conftest import ROOT, VLLM_PYTHON, require_vllm

pytestmark = pytest.mark.slow
TEACHER = ROOT / "assets" / "teacher-tiny"


@pytest.fixture(scope="module")
def pruned_teacher(tmp_path_factory):
    from compress.prune.prune import prune_model, standalone_job

    out = tmp_path_factory.mktemp("pruned") / "student"
    train, _ = make_splits(TaskWorldConfig().tasks, 200, 10, seed=1)
    texts = [r["prompt"] + r["answer"] for r in train[:64]]
    starts = [len(r["prompt"]) for r in train[:64]]
    job = standalone_job(TEACHER, texts, PruneConfig(method="depth", num_layers=4), out, starts)
    prune_model(job, log=lambda _: None)
    return out


def _with_bos(checkpoint, out):
    """A copy whose tokenizer prepends BOS to every text (as Llama's do): both backends must follow it."""
    shutil.copytree(checkpoint, out)
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [2], "tokens": ["<s>"]}},
    }  # fmt: skip
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
def test_hf_and_vllm_backends_agree(pruned_teacher, tmp_path, bos):
    require_vllm()
    from evaluation.harness import (
        evaluate_checkpoint,
        standalone_job,
        tokenizer_adds_bos,
        write_choice_task,
        write_task,
    )

    checkpoint = _with_bos(pruned_teacher, tmp_path / "bos") if bos else pruned_teacher
    assert tokenizer_adds_bos(checkpoint) is bos

    # The easy world's tasks plus the language (a rolling log-likelihood task beside exact match).
    world = TaskWorldConfig(tasks=[*TaskWorldConfig().tasks, "lang"], n_heldout=144)
    _, heldout = world_splits(world)
    tasks_dir, mc_dir = tmp_path / "tasks", tmp_path / "mc"
    write_task(heldout, tasks_dir, max_gen_toks=16)
    write_choice_task([r for r in heldout if r["task"] != "lang"], mc_dir, "taskworld_mc")

    results = {}
    for backend in ("hf", "vllm"):
        cfg = EvaluateConfig(
            tasks=["taskworld", "taskworld_mc"],
            include_path=mc_dir,
            backend=backend,
            throughput=None if bos else True,  # hf + throughput: the server starts after the hf model is done
            batch_size=16,
            vllm={"vllm_python": VLLM_PYTHON, "max_model_len": 128},
        )
        job = standalone_job(checkpoint, cfg, tasks_dir, dtype="auto", label="pruned", log_dir=tmp_path / "logs")
        results[backend] = evaluate_checkpoint(job, log_samples=True)
    hf, vl = results["hf"], results["vllm"]
    assert vl["backend"] == "vllm" and hf["backend"] == "hf"
    em_hf = hf["scores"]["taskworld"]["exact_match"]["value"]
    em_vllm = vl["scores"]["taskworld"]["exact_match"]["value"]
    # The pruned model is wrong on some examples: the comparison is not one of two perfect scores.
    assert 0.0 < em_hf < 1.0, em_hf
    assert em_vllm == em_hf
    assert vl["scores"]["taskworld_mc"]["acc"]["value"] == hf["scores"]["taskworld_mc"]["acc"]["value"]
    # Per example: the same generations, the same choice picked.
    assert vl["samples"]["taskworld"] == hf["samples"]["taskworld"]
    assert vl["samples"]["taskworld_mc"] == hf["samples"]["taskworld_mc"]
    # Per family: lm-eval's per-example exact match, grouped by the row's family, equals a recount
    # of the generations against the answers.
    tasks = [r for r in heldout if r["task"] != "lang"]
    families = sorted({r["task"] for r in tasks})
    for res in (hf, vl):
        assert [t for t in res["scores"] if t.startswith("taskworld_") and t != "taskworld_mc"] == [
            f"taskworld_{f}" for f in dict.fromkeys(r["task"] for r in tasks)
        ]  # in the order of the held-out split
        for family in families:
            pairs = [(r, g) for r, g in zip(tasks, res["samples"]["taskworld"], strict=True) if r["task"] == family]
            recount = sum(g == r["answer"] for r, g in pairs) / len(pairs)
            assert res["scores"][f"taskworld_{family}"]["exact_match"]["value"] == pytest.approx(recount)
            assert res["n"][f"taskworld_{family}"] == len(pairs)
    # The language's per-character NLL: the same texts scored from the same prefix token.
    nll_hf, nll_vllm = (r["scores"]["language"]["bits_per_byte"]["value"] for r in (hf, vl))
    assert nll_vllm == pytest.approx(nll_hf, rel=1e-3)
    assert vl["throughput"]["tokens_per_s"] > 0 and vl["throughput"]["tokens"] == 64 * vl["throughput"]["max_tokens"]
    assert (hf["throughput"] is None) is bos
    assert "pruned" in (tmp_path / "logs" / "vllm-eval-pruned.log").name
    json.dumps(vl)  # results are plain JSON (they go into the manifest)
