"""The prepare stage: training prompts and calibration texts, read or drawn from the teacher.

Reads every data source (or draws self-instruct prompts from the served teacher), renders, mixes,
deduplicates and decontaminates against the evaluation sets (``compress.data.prepare``). Writes
``data/prompts.jsonl``, ``data/calibration.jsonl`` and, when a source holds prompts out,
``data/heldout_prompts.jsonl``. Pre-flight: every source is read (a bad line anywhere fails before
any stage) and a self-instruct source's chat template and context are checked.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from compress.config import ConfigError, DatasetSource, PipelineConfig, SelfInstructSource
from compress.data.prepare import HELDOUT_PROMPTS
from compress.jobs import PrepareJob
from stages.pipeline import Context, StageSpec
from stages.runner import Done, Stage

if TYPE_CHECKING:
    from stages.preflight import Preflight

HEAD_ROWS = 5  # records a plan reads of each source (a run reads them all)


def declare(cfg: PipelineConfig, ctx: Context, done: dict[str, Done]) -> list[Stage]:
    data_dir = ctx.run_dir / "data"
    job = prepare_job(cfg, ctx)
    self_instruct = job.self_instruct_teacher is not None
    return [
        Stage(
            name="prepare",
            job=job,
            body=prepare,
            inputs={"teacher": ctx.teacher.identity, "eval_sets": ctx.eval_id},
            outputs={
                "prompts": data_dir / "prompts.jsonl",
                "calibration": data_dir / "calibration.jsonl",
                **({"heldout": data_dir / HELDOUT_PROMPTS} if self_instruct else {}),
            },
            # A self-instruct source serves the teacher (heavy), unless an endpoint does.
            heavy=self_instruct and cfg.generate.endpoint is None,
        )
    ]


def prepare_job(cfg: PipelineConfig, ctx: Context) -> PrepareJob:
    """The prepare job of ``cfg``: its data, the task world, the calibration source and the teacher."""
    from compress.data.prepare import source_fingerprint, uses_self_instruct

    data = cfg.effective_data()
    sources = [*data.sources, cfg.prune.calibration_source]
    gen = cfg.generate
    # What a self-instruct source's teacher writes depends on how it runs: backend, dtype, and the
    # device transformers samples on (a vLLM server's device is not ours to choose).
    sampler = f"{gen.backend}/{gen.dtype}/{ctx.device if gen.backend == 'hf' else 'served'}"
    return PrepareJob(
        data=data,
        taskworld=cfg.taskworld,
        uses_taskworld=cfg.uses_taskworld,
        calibration_source=cfg.prune.calibration_source,
        calibration_samples=cfg.prune.calibration_samples,
        source_content=[source_fingerprint(s) for s in sources if isinstance(s, DatasetSource)],
        max_prompt_tokens=gen.max_prompt_tokens(ctx.model_config),
        teacher=ctx.teacher,
        eval_id=ctx.eval_id,
        evaluate=cfg.evaluate,
        tasks_dir=ctx.tasks_dir,
        serving=gen,
        self_instruct_teacher=sampler if uses_self_instruct(data) else None,
        device=ctx.device,
        out_dir=ctx.run_dir / "data",
    )


def prepare(job: PrepareJob) -> dict[str, Any]:
    """Training prompts and calibration texts: read (or draw from the teacher), render, mix, deduplicate,
    decontaminate. A self-instruct source serves the teacher as the generate stage does."""
    from compress.data.prepare import prepare_data
    from compress.data.self_instruct import pre_query_template, self_instruct_sources, serving_config
    from compress.generate.generate import open_teacher
    from compress.models import load_tokenizer
    from evaluation.tasks import eval_texts
    from stages.prefect_task import log, progress

    texts = eval_texts(job.evaluate, job.tasks_dir) if job.data.decontaminate else []
    teacher = None
    if job.self_instruct_teacher is not None:
        tokenizer = load_tokenizer(job.teacher.path, job.teacher.trust_remote_code)
        longest = max(len(pre_query_template(tokenizer, s.system_prompt).ids) for s in self_instruct_sources(job.data))
        server_log = job.out_dir.parent / "logs" / "vllm-server-prepare.log"
        teacher = functools.partial(
            open_teacher, serving_config(job.serving, longest), job.teacher, server_log, job.device, log
        )
    report = prepare_data(job, texts, progress("prepare", "prepare"), teacher)
    for si in report.get("self_instruct", []):
        log(
            "self-instruct source %d: drew %d, kept %d (%.0f%%), dropped %s; %d training + %d held out (%s), %.1f s",
            si["index"], si["drawn"], si["kept"], 100 * si["keep_rate"],
            {k: v for k, v in si["dropped"].items() if v}, si["train"], si["heldout"],
            job.out_dir / report["heldout_path"], si["seconds"],
        )  # fmt: skip
    log(
        "%d training prompts; dropped %d longer than %d tokens, %d duplicates and %d that appear in an evaluation "
        "set (%d eval prompts checked)",
        report["prompts"], report["too_long_dropped"], report["max_prompt_tokens"], report["duplicates_dropped"],
        report["eval_overlap_dropped"], report["eval_prompts_checked"],
    )  # fmt: skip
    return report


def check(cfg: PipelineConfig, pf: Preflight) -> None:
    """Read and check every data source; ``pf.data`` gets one line each.

    A full check (a run) reads every record of a local source (a bad line anywhere is caught before
    any stage) and the first rows of a hub dataset (the stage reads the rest); a plan reads the first
    rows. A self-instruct source needs the tokenizer's chat template, and room for its messages in
    the context the teacher is served with.
    """
    from compress.data.prepare import check_chat_template, check_records, is_local, read_source
    from compress.data.self_instruct import check_source, describe_source

    for where, src in dataset_sources(cfg):
        if isinstance(src, SelfInstructSource):
            if where == "prune.calibration_source":
                raise ConfigError(
                    "prune.calibration_source: a self_instruct source is for data.sources (unset, the calibration "
                    "texts are the first training rows, self-instruct ones included)"
                )
            check_source(src, pf.tokenizer(), cfg.generate.context_length(pf.model_config), where)
            pf.data.append(describe_source(src, where))
            continue
        if not isinstance(src, DatasetSource):
            w = cfg.taskworld
            pf.data.append(f"{where}: task world ({', '.join(w.tasks)}), {w.n_train} training prompts, seed {w.seed}")
            continue
        whole = pf.full and is_local(src)
        records = read_source(src, head=None if whole else HEAD_ROWS, where=where)
        check_records(src, records, where)
        if src.messages_field:
            check_chat_template(pf.chat_template(), where)
        field_desc = f"messages '{src.messages_field}'" if src.messages_field else f"prompt '{src.prompt_field}'"
        if src.answer_field:
            field_desc += f", answer '{src.answer_field}'"
        count = f"{len(records)} records" if whole else f"first {len(records)} records"
        pf.data.append(f"{where}: {src.label} [{src.split}], {field_desc}: {count} ok")


def dataset_sources(cfg: PipelineConfig) -> list[tuple[str, Any]]:
    """(where in the config, source) for every data source and the calibration source."""
    sources = [(f"data.sources[{i}]", s) for i, s in enumerate(cfg.effective_data().sources)]
    if cfg.prune.calibration_source is not None:
        sources.append(("prune.calibration_source", cfg.prune.calibration_source))
    return sources


STAGE = StageSpec(
    name="prepare",
    summary="training prompts and calibration texts: read, or drawn from the teacher; deduplicated, decontaminated",
    declare=declare,
    check=check,
)
