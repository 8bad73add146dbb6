"""The ``distillflow`` command line (Typer). Nothing imports this module.

Configs are validated before anything heavy is imported, so a bad config fails in well under a
second with one line naming the file and the field, and exit code 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from compress.config import STAGES, BootstrapConfig, ConfigError, PipelineConfig, load_config

app = typer.Typer(help="distillflow: prune, distill and benchmark LLMs as a Prefect flow.", no_args_is_help=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value.")]
ForceOpt = Annotated[
    list[str] | None,
    typer.Option("--force", help=f"Re-run this stage and every stage after it ({', '.join(STAGES)})."),
]
DEMO_CONFIG = Path("configs/tiny.yaml")
BOOTSTRAP_CONFIG = Path("configs/bootstrap.yaml")
# How the demo's teacher is made when it is missing: the bootstrap configs in order (a later one
# may continue from an earlier one's output through init_from). Today one run makes it.
DEMO_BOOTSTRAP = (BOOTSTRAP_CONFIG,)


def _env_defaults() -> None:
    """Offline, quiet defaults for the libraries we drive (a user's own settings win)."""
    # The hub is not switched off here: a hub teacher or dataset is fetched when reachable, and
    # preflight switches every HF library offline when it is not (so nothing waits on a timeout).
    for key, value in {
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "TRANSFORMERS_VERBOSITY": "error",
    }.items():
        os.environ.setdefault(key, value)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(path: Path, overrides: list[str] | None, model_cls=PipelineConfig):
    try:
        return load_config(path, overrides or [], model_cls)
    except ConfigError as e:
        _fail(str(e))


def _preflight(cfg: PipelineConfig, full: bool):
    """The checks every run makes before its first stage (one line and exit 2 on bad input)."""
    _env_defaults()
    from stages.preflight import preflight

    pf = _guard(lambda: preflight(cfg, full=full))
    for w in pf.warnings:
        typer.echo(f"warning: {w}", err=True)
    return pf


# The run's log file once a flow is about to run (tracebacks go there, not to the terminal).
_RUN_LOG: list[Path] = []


def _checked_flow(cfg: PipelineConfig, name: str):
    """Preflight while the run's own Prefect API server boots; the flow ``flows.compress.<name>`` once it answers."""
    _env_defaults()
    from flows.local_server import start_local_server

    server = start_local_server()
    _preflight(cfg, full=True)
    _hold_run_dir(cfg.run_dir)
    import flows.compress

    _route_tracebacks(cfg.run_dir)
    if server is not None:
        server.wait_ready()
    return getattr(flows.compress, name)


def _hold_run_dir(run_dir: Path) -> None:
    """Take the run directory's lock for this process before Prefect starts (the flow re-enters it), so
    that a directory another run is writing is refused in one line."""
    from compress.rundir import RunDirLock

    _guard(RunDirLock(run_dir).__enter__)  # held until the process exits


def _route_tracebacks(run_dir: Path) -> None:
    from flows.console import route_tracebacks

    _RUN_LOG[:] = [route_tracebacks(run_dir)]


def _run_pipeline(cfg: PipelineConfig) -> dict:
    t0 = time.time()
    return _run_and_print(_checked_flow(cfg, "compress_pipeline"), cfg, t0)


def _run_and_print(flow_fn, cfg, t0: float) -> dict:
    """Run ``flow_fn(cfg)`` and print its summary; a gate not met prints the results, then why (exit 1)."""
    from compress.gates import GateFailed
    from compress.lineage import read_json

    try:
        result = flow_fn(cfg)
    except GateFailed as e:
        # Every report file is written before a gate fails the run: show the results, then why.
        summary = read_json(cfg.run_dir.resolve() / "summary.json")
        _print_summary(summary, cfg.run_dir.resolve(), t0)
        _fail(str(e), code=1)
    _print_summary(result.summary, Path(result.run_dir), t0)
    return result.summary


def _print_summary(summary: dict, run_dir: Path, t0: float | None = None) -> None:
    """The results table, every task, the data line, gates and stages, as the terminal shows a run."""
    from evaluation.report import data_line, format_gates, format_stages, format_table, score_columns, scores_table

    typer.echo("\n" + format_table(summary))
    if len(score_columns(summary)) > 1:
        typer.echo("\n" + scores_table(summary))
    data = summary.get("data") or {}
    if data:
        typer.echo("\ndata: " + data_line(data))
    if summary.get("gates"):
        typer.echo("\ngates:\n" + format_gates(summary))
    typer.echo("\nstages:\n" + format_stages(summary))
    hits = sum(s["cached"] for s in summary["stages"].values())
    total = len(summary["stages"])
    note = "every stage a cache hit" if hits == total else f"{hits}/{total} stages were cache hits"
    took = f"finished in {time.time() - t0:.1f}s; " if t0 is not None else ""
    typer.echo(f"\n{note}; {took}run directory: {run_dir}\nreport: {run_dir / 'report.md'}")


@app.command(help=f"Run the whole pipeline ({', '.join(STAGES)}) on CONFIG.")
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML config.")], set_: SetOpt = None, force: ForceOpt = None
) -> None:
    cfg = _load(config, [*(set_ or []), *_force_overrides(force)])
    _guard(lambda: _run_pipeline(cfg))


@app.command()
def prune(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML config.")], set_: SetOpt = None, force: ForceOpt = None
) -> None:
    """Run only the prune stage (and the data preparation it needs) on CONFIG."""
    cfg = _load(config, [*(set_ or []), *_force_overrides(force)])
    _guard(lambda: _run_prune(cfg))


def _run_prune(cfg: PipelineConfig) -> None:
    t0 = time.time()
    result = _checked_flow(cfg, "prune_flow")(cfg)
    r = result.summary["prune"]
    cached = result.summary["stages"]["prune"]["cached"]
    if cfg.student is not None:
        typer.echo(
            f"\nstudent given: {r['adopted_from']}, no pruning: {r['student_shape']}\n"
            f"parameters {r['params_after']:,} ({r['ratio']:.1%} of the teacher's {r['params_before']:,})\n"
            f"student checkpoint: {r['path']}{' (cache hit)' if cached else ''}\n"
            f"finished in {time.time() - t0:.1f}s"
        )
        return
    typer.echo(
        f"\n{r['method']} pruning ({r['selection']}), {r['family']}: {r['teacher_shape']} -> {r['student_shape']}\n"
        f"parameters {r['params_before']:,} -> {r['params_after']:,} ({r['ratio']:.1%}); calibration loss "
        f"{r['calibration_loss_before']:.4f} -> {r['calibration_loss_after']:.4f}\n"
        f"kept layers {r['kept_layers']}\n"
        f"student checkpoint: {r['path']}{' (cache hit)' if cached else ''}; report: "
        f"{Path(result.run_dir) / 'importance.json'}, {Path(result.run_dir) / 'plots' / 'importance.png'}\n"
        f"finished in {time.time() - t0:.1f}s"
    )


def _force_overrides(force: list[str] | None) -> list[str]:
    return [f"force=[{', '.join(force)}]"] if force else []


@app.command()
def plan(config: Annotated[Path, typer.Argument(help="Pipeline YAML config.")], set_: SetOpt = None) -> None:
    """Check CONFIG and print what a run would do, without loading any weights.

    Validates the config, reads the teacher's config.json, the first rows of every data source and
    the evaluation task names, and prints the stages, the expected student size and which stages
    of an earlier run in the same directory would be cache hits.
    """
    cfg = _load(config, set_)
    pf = _preflight(cfg, full=False)
    from flows.plan import describe

    _guard(lambda: typer.echo(describe(cfg, str(config), pf)))


@app.command("evaluate-only")
def evaluate_only(
    config: Annotated[Path, typer.Argument(help="Evaluate-only YAML config (models, evaluate).")], set_: SetOpt = None
) -> None:
    """Score existing checkpoints with lm-eval: the tasks, cache, report and gates of a full run.

    CONFIG names the checkpoints (``models: [{name, path}, ...]``) and the ``evaluate`` section of a
    pipeline config; see configs/evaluate-only.yaml. Exit 1 when a gate is not met.
    """
    from compress.config import EvaluateOnlyConfig

    cfg = _load(config, set_, EvaluateOnlyConfig)
    _guard(lambda: _run_evaluate_only(cfg))


def _run_evaluate_only(cfg) -> dict:
    t0 = time.time()
    _env_defaults()
    from flows.local_server import start_local_server

    server = start_local_server()
    _hold_run_dir(cfg.run_dir)
    import flows.evaluate_only

    _route_tracebacks(cfg.run_dir)
    if server is not None:
        server.wait_ready()
    return _run_and_print(flows.evaluate_only.evaluate_only, cfg, t0)


@app.command()
def stages() -> None:
    """List the pipeline's stages in order, each with what it makes (stages/<name>.py)."""
    from stages.pipeline import stage_specs

    for spec in stage_specs():
        typer.echo(f"{spec.name:<10}{spec.summary}")


@app.command()
def demo(set_: SetOpt = None, force: ForceOpt = None) -> None:
    """The embedded default: bootstrap its teacher if it is missing, then run configs/tiny.yaml."""
    from compress.config import load_yaml

    # Read before validating: the config checks that its teacher exists, which is what is decided here.
    teacher = Path(load_yaml(DEMO_CONFIG)["teacher"]["path"])
    if not (teacher / "config.json").is_file():
        # Phases in order: a later phase's init_from is an earlier phase's output, so each config
        # is loaded (and its paths checked) only once the phases before it have run.
        for path in DEMO_BOOTSTRAP:
            boot = _load(path, None, BootstrapConfig)
            typer.echo(f"no teacher at {teacher}: training {boot.out_dir} ({path})")
            _guard(lambda b=boot, p=path: _bootstrap(b, f"distillflow bootstrap --config {p}"))
    cfg = _load(DEMO_CONFIG, [*(set_ or []), *_force_overrides(force)])
    _guard(lambda: _run_pipeline(cfg))


@app.command()
def bootstrap(
    config: Annotated[Path, typer.Option(help="Bootstrap YAML config.")] = BOOTSTRAP_CONFIG, set_: SetOpt = None
) -> None:
    """Train the tiny task-world teacher (cached: an identical teacher is not retrained)."""
    cfg = _load(config, set_, BootstrapConfig)
    command = " ".join(["distillflow bootstrap --config", str(config), *(f"--set {s}" for s in set_ or [])])
    _guard(lambda: _bootstrap(cfg, command))


def _bootstrap(cfg: BootstrapConfig, command: str | None = None) -> None:
    _env_defaults()
    from flows.bootstrap import bootstrap_teacher_flow

    m = bootstrap_teacher_flow(cfg, command)
    em = m.get("heldout_exact_match")
    lang = m.get("language")
    typer.echo(
        f"teacher {cfg.out_dir}: {m['params']:,} params"
        + ("" if em is None else f", held-out exact match {em:.3f}")
        + ("" if not lang else f", language NLL {lang['nll']:.4f} (floor {lang['floor_entropy']:.4f}) nats/char")
        + (" (cache hit)" if m.get("cached") else "")
    )


@app.command()
def serve() -> None:
    """Serve the deployments of prefect.yaml from this process (runs from the dashboard execute here)."""
    _env_defaults()
    from flows.serve import serve as serve_deployments

    typer.echo("serving the deployments of prefect.yaml; Ctrl-C stops")
    serve_deployments()


@app.command()
def verify(run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/demo.")]) -> None:
    """Check every output file a run's manifest lists (size and sha256); exit 1 naming each one that differs."""
    from compress.integrity import verify_run

    checked, problems = verify_run(run_dir)
    for line in problems:
        typer.echo(line, err=True)
    if problems:
        _fail(f"{run_dir}: {len(problems)} of the run's files are missing or changed ({checked} checked)", code=1)
    typer.echo(f"{run_dir}: all {checked} recorded output files match their size and sha256")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/demo.")]) -> None:
    """Rebuild a finished run's report from its files and print it; exit 1 when a gate is not met.

    Writes summary.json, report.md, the plots and the student's model card again from the run's
    config.yaml, eval/results.json, eval/run.json, manifest.json and training logs: after a change
    of evaluate.gates or evaluate.headline in config.yaml, nothing needs to re-run.
    """
    from evaluation.build import build_report, failed_gates

    if not (run_dir / "eval" / "results.json").is_file():
        _fail(f"{run_dir}/eval/results.json: not found (has the run finished its evaluate stages?)")
    summary = _guard(lambda: build_report(run_dir))
    _print_summary(summary, run_dir)
    failed = failed_gates(summary)
    if failed:
        _fail(failed, code=1)


def _guard(fn):
    """Run ``fn`` and return its result; report a failure as one line (DISTILLFLOW_DEBUG=1: traceback).

    A refused input exits 2; a cancelled run (Ctrl-C) 130; any other failure 1, with its root cause
    and, once a run has started, the log that holds the traceback.
    """
    try:
        return fn()
    except ConfigError as e:
        _fail(str(e))
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _fail("cancelled: finished stages are kept in the run directory; the same command resumes", code=130)
    except Exception as e:
        if os.environ.get("DISTILLFLOW_DEBUG"):
            raise
        where = f" (log: {_RUN_LOG[0]})" if _RUN_LOG else ""
        _fail(f"{describe_failure(e)}{where}", code=1)


def describe_failure(e: BaseException) -> str:
    """One line for a failure: our own errors by their message, anything else with its type (the message alone
    of a KeyError or an OSError does not say what happened)."""
    from compress.errors import first_line

    own = e.__class__.__module__.split(".")[0] in ("compress", "stages", "flows", "evaluation")
    return first_line(e) if own and str(e) else f"{type(e).__name__}: {first_line(e)}"


def main() -> None:
    app(prog_name="distillflow")


if __name__ == "__main__":
    sys.exit(main())
