"""The pipeline as a list of stage declarations: prepare, prune, generate, distill, evaluate.

``run_pipeline`` declares each stage (what it runs, on what, into which paths, keyed by what) and
hands it to a runner: ``StageRunner`` runs it through Prefect, ``PlanRunner`` only predicts whether
it would be a cache hit. Both see the same declarations, so ``distillflow plan`` and the flow can
never disagree on a cache key. This module does not import Prefect (``plan`` stays fast); tasks are
named and looked up by the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compress.cachekey import key_hash
from compress.config import DatasetSource, EvaluateConfig, PipelineConfig, config_hash
from compress.data.prepare import HELDOUT_PROMPTS
from stages.runner import Done, Stage

# Generate settings that decide what a self-instruct source's teacher writes (vLLM or transformers, the
# weights' dtype): in the prepare key when one is used. The sampling settings are the source's own.
SELF_INSTRUCT_FIELDS = {"backend", "dtype"}


@dataclass
class Context:
    """What every stage needs besides the config: where things are and what the inputs are."""

    run_dir: Path
    teacher_dir: Path
    teacher_id: str  # hub id @ commit, or the sha256 of the local teacher
    eval_id: str  # identity of the evaluation sets (task names, held-out split, task YAMLs)
    tasks_dir: Path  # the task world's lm-eval task, when evaluated
    device: str
    model_config: dict = field(default_factory=dict)  # the teacher's config.json (sizes the served context)
    student_dir: Path | None = None  # a student of the user's own (student.path): no pruning
    student_id: str | None = None  # its content identity


def _sources_content(cfg: PipelineConfig) -> list[str]:
    from compress.data.prepare import source_fingerprint

    sources = [*cfg.effective_data().sources, cfg.prune.calibration_source]
    return [source_fingerprint(s) for s in sources if isinstance(s, DatasetSource)]


def run_pipeline(cfg: PipelineConfig, ctx: Context, run, until: str | None = None) -> dict[str, Done]:
    """Declare and run every stage in order (up to ``until``); ``run(stage) -> Done``. Results by name."""
    d, t, c = ctx.run_dir, str(ctx.teacher_dir), cfg
    remote, dtype = c.teacher.trust_remote_code, c.teacher.dtype
    done: dict[str, Done] = {}
    data_dir, logits_dir = d / "data", d / "logits"

    # A self-instruct source draws prompts from the teacher: what it writes depends on how it is run (the
    # backend and dtype of generate), and the stage serves a model (heavy) unless an endpoint does.
    self_instruct = any(s.type == "self_instruct" for s in c.effective_data().sources)
    done["prepare"] = prep = run(
        Stage(
            name="prepare",
            task="prepare",
            params={
                "cfg": c,
                "teacher_dir": t,
                "tasks_dir": str(ctx.tasks_dir),
                "out_dir": str(data_dir),
                "device": ctx.device,
            },
            key=[
                c.effective_data(),
                config_hash(c.taskworld) if c.uses_taskworld else "-",
                config_hash(c.prune, include={"calibration_samples", "calibration_source"}),
                _sources_content(c),
                c.generate.max_prompt_tokens(ctx.model_config),  # the prompt-length filter
                ctx.teacher_id,  # its tokenizer and chat template
                ctx.eval_id,  # decontamination
                *([config_hash(c.generate, include=SELF_INSTRUCT_FIELDS), _hf_device(c, ctx)] if self_instruct else []),
            ],
            inputs={"teacher": ctx.teacher_id, "eval_sets": ctx.eval_id},
            outputs={
                "prompts": data_dir / "prompts.jsonl",
                "calibration": data_dir / "calibration.jsonl",
                **({"heldout": data_dir / HELDOUT_PROMPTS} if self_instruct else {}),
            },
            config=c.effective_data(),
            heavy=self_instruct and c.generate.endpoint is None,
        )
    )
    done["prune"] = pruned = run(
        adopt_stage(ctx, d / "pruned")
        if ctx.student_dir is not None
        else Stage(
            name="prune",
            task="prune",
            params={
                "teacher_dir": t,
                "calibration": str(data_dir / "calibration.jsonl"),
                "cfg": c.prune,
                "out_dir": str(d / "pruned"),
                "device": ctx.device,
                "dtype": dtype,
                "trust_remote_code": remote,
                "teacher_id": ctx.teacher_id,
            },
            key=[c.prune, ctx.teacher_id, prep.hashes.get("calibration"), dtype, ctx.device],
            inputs={"teacher": ctx.teacher_id, "calibration": prep.hashes.get("calibration")},
            outputs={"pruned": d / "pruned"},
            config=c.prune,
        )
    )
    if until == "prune":
        return done
    # Log-probs cost the server half its speed: ask for them only when a student reads the cache.
    need_logits = c.distill.teacher_source == "cached"
    done["generate"] = gen = run(
        Stage(
            name="generate",
            task="generate",
            params={
                "teacher_dir": t,
                "prompts": str(data_dir / "prompts.jsonl"),
                "cfg": c.generate,
                "run_dir": str(d),
                "trust_remote_code": remote,
                "need_logits": need_logits,
                "device": ctx.device,
                "teacher_id": ctx.teacher_id,
            },
            key=[
                key_hash(c.generate, frozenset({f"mode={c.generate.mode}", f"logits={c.generate.logits}"})),
                ctx.teacher_id,
                prep.hashes.get("prompts"),
                need_logits,
            ],
            inputs={"teacher": ctx.teacher_id, "prompts": prep.hashes.get("prompts")},
            outputs={"data": data_dir / "train.jsonl", "logits": logits_dir},
            config=c.generate,
        )
    )
    data_sha = _join(gen.hashes.get("data"), gen.hashes.get("logits"))
    models = {"teacher": (ctx.teacher_dir, ctx.teacher_id), "pruned": (d / "pruned", pruned.hashes.get("pruned"))}
    students = {"student": True} | ({"sft": False} if c.distill.sft_baseline else {})
    for name, use_logits in students.items():
        done[f"distill_{name}"] = trained = run(
            Stage(
                name=f"distill_{name}",
                task="distill",
                params={
                    "student_dir": str(d / "pruned"),
                    "data_dir": str(data_dir),
                    "logits_dir": str(logits_dir),
                    "cfg": c.distill,
                    "out_dir": str(d / name),
                    "use_teacher_logits": use_logits,
                    "device": ctx.device,
                    "teacher_dir": t,
                    "trust_remote_code": remote,
                    # The hidden-state loss pairs each student layer with the teacher layer it came from.
                    # Not in the key: the pruned checkpoint's hash already decides it.
                    "teacher_layers": pruned.result.get("kept_layers"),
                },
                key=[
                    key_hash(c.distill, frozenset({"kd"} if use_logits else ())),
                    use_logits,
                    pruned.hashes.get("pruned"),
                    data_sha,
                    ctx.device,
                    # The online teacher's weights decide the KD student; data_sha covers the cached one.
                    # (Never None here: the planner reads a None key part as "upstream not known yet".)
                    ctx.teacher_id if use_logits and c.distill.teacher_source == "online" else "no online teacher",
                ],
                inputs={"pruned": pruned.hashes.get("pruned"), "data": data_sha},
                outputs={name: d / name},
                config=c.distill,
            )
        )
        models[name] = (d / name, trained.hashes.get(name))
    fidelity = None
    if c.evaluate.fidelity is not None:
        # Every model is scored along the teacher's greedy answers to the prompts a source held out.
        fidelity = {
            "teacher_dir": t,
            "teacher_id": ctx.teacher_id,
            "prompts": str(data_dir / HELDOUT_PROMPTS),
            "prompts_sha": prep.hashes.get("heldout"),
            "cache_dir": str(d / "eval" / "fidelity"),
        }
    for name, (model_dir, model_sha) in models.items():
        done[f"evaluate_{name}"] = run(
            evaluate_stage(
                name,
                model_dir,
                model_sha,
                c.evaluate,
                ctx.tasks_dir,
                ctx.eval_id,
                ctx.device,
                dtype,
                remote,
                d / "logs",
                fidelity,
            )
        )
    return done


def adopt_stage(ctx: Context, out_dir: Path) -> Stage:
    """The prune stage of a run with a student of the user's own: copy it where the pruned student goes."""
    return Stage(
        name="prune",
        task="adopt",
        params={"student_dir": str(ctx.student_dir), "teacher_dir": str(ctx.teacher_dir), "out_dir": str(out_dir)},
        key=[ctx.student_id, ctx.teacher_id],
        inputs={"student": ctx.student_id, "teacher": ctx.teacher_id},
        outputs={"pruned": out_dir},
        heavy=False,
    )


def evaluate_stage(
    name: str,
    model_dir: Path,
    model_sha: str | None,
    evaluate: EvaluateConfig,
    tasks_dir: Path,
    eval_id: str,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    log_dir: Path,
    fidelity: dict | None = None,
) -> Stage:
    """lm-eval of one checkpoint on every task: the pipeline's evaluations and the evaluate-only flow's.

    ``fidelity`` (the teacher, its identity and the held-out prompts) adds the fidelity scores.
    """
    fid_key = [fidelity["teacher_id"], fidelity["prompts_sha"]] if fidelity else []
    return Stage(
        name=f"evaluate_{name}",
        task="evaluate",
        params={
            "model_dir": str(model_dir),
            "tasks_dir": str(tasks_dir),
            "cfg": evaluate,
            "label": name,
            "device": device,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "log_dir": str(log_dir),
            "fidelity": {k: v for k, v in fidelity.items() if k != "prompts_sha"} if fidelity else None,
        },
        key=[key_hash(evaluate), eval_id, model_sha, dtype, device, *fid_key],
        inputs={"model": model_sha, "eval_sets": eval_id},
        config=evaluate,
    )


def _hf_device(cfg: PipelineConfig, ctx: Context) -> str:
    """The device transformers samples on (backend hf); a vLLM server's device is not ours to choose."""
    return ctx.device if cfg.generate.backend == "hf" else "served"


def _join(*hashes: str | None) -> str | None:
    """Several hashes as one key part; unknown (None) when any is unknown (``plan``, before a run)."""
    return None if any(h is None for h in hashes) else "".join(hashes)  # type: ignore[arg-type]
