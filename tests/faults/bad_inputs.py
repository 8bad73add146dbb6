"""A catalog of bad inputs: configs, CLI arguments, checkpoints and data files a user may hand to ``distillflow run``.

Each case is run as the user would (``distillflow run configs/tiny.yaml --set ...`` in a fresh
process, the run directory under a temporary ``runs_dir``) and must be refused with exactly one
line on stderr, ``error: ...``, naming the field or file, with a non-zero exit, no traceback and no
exception class name, before the run directory exists.

``python -m tests.faults.bad_inputs`` runs every case and writes the table of ``docs/reliability.md``
(between its ``bad-inputs`` markers): the case, the exit code, the line and how long the refusal took.
``tests/faults/test_bad_inputs.py`` runs the same cases in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "assets" / "teacher-small"
# An exception class name in the one line: ``ValueError``, ``KeyError: ...`` (a user should not need them).
CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b")


@dataclass(frozen=True)
class Case:
    """One bad input: ``--set`` overrides (``{tmp}`` is the case's directory), files it needs, what the line names."""

    id: str
    what: str
    sets: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    setup: Callable[[Path], None] | None = None
    args: list[str] = field(default_factory=list)  # other CLI arguments (before the --set ones)
    config: str = "configs/tiny.yaml"


def _teacher_copy(tmp: Path, edit: Callable[[dict], None] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the demo teacher with its config.json edited and some files left out (weights linked, not copied)."""
    out = tmp / "teacher"
    out.mkdir(parents=True, exist_ok=True)
    for f in TEACHER.iterdir():
        if f.name in drop:
            continue
        if f.name == "model.safetensors":
            (out / f.name).symlink_to(f)
        else:
            shutil.copy(f, out / f.name)
    if edit is not None:
        config = json.loads((out / "config.json").read_text())
        edit(config)
        (out / "config.json").write_text(json.dumps(config))
    return out


def _write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return setup


def _source(file: str, **fields: str) -> str:
    extra = "".join(f", {k}: {v}" for k, v in fields.items())
    return f"data.sources=[{{path: json, data_files: '{{tmp}}/{file}'{extra}}}]"


GOOD_ROW = json.dumps({"prompt": "2+2=", "answer": "4"})

CASES: list[Case] = [
    # The config file and the command line.
    Case(
        "config-missing",
        "a config file that does not exist",
        config="{tmp}/nope.yaml",
        expect=["nope.yaml", "not found"],
    ),
    Case(
        "config-not-yaml",
        "a config that is not YAML",
        config="{tmp}/bad.yaml",
        setup=_write("bad.yaml", "a: [1, 2\n"),
        expect=["bad.yaml", "invalid YAML"],
    ),
    Case(
        "config-a-list",
        "a config whose top level is a list",
        config="{tmp}/list.yaml",
        setup=_write("list.yaml", "- 1\n"),
        expect=["list.yaml", "mapping"],
    ),
    Case("set-no-equals", "--set without key=value", sets=["prune.num_layers"], expect=["--set", "key.path=value"]),
    Case("set-not-yaml", "--set whose value is not YAML", sets=["name=["], expect=["--set name", "not YAML"]),
    Case("set-unknown-key", "an unknown top-level key", sets=["nonsense=1"], expect=["nonsense", "unknown key"]),
    Case(
        "set-unknown-nested", "an unknown key in a section", sets=["prune.nope=1"], expect=["prune.nope", "unknown key"]
    ),
    Case(
        "set-into-scalar",
        "a key under a value that is not a section",
        sets=["name.x=1"],
        expect=["name", "not a section"],
    ),
    Case(
        "force-unknown-stage", "--force naming no stage", args=["--force", "polish"], expect=["force[0]", "'prepare'"]
    ),
    Case(
        "name-dots",
        "a run name that is only dots (would write outside runs_dir)",
        sets=["name=.."],
        expect=["name", "outside runs_dir"],
    ),
    Case("name-slash", "a run name with a slash", sets=["name=a/b"], expect=["name"]),
    Case("device-unknown", "an unknown device", sets=["device=tpu"], expect=["device"]),
    # The run directory.
    Case(
        "runs-dir-unwritable",
        "runs_dir where nothing can be written",
        sets=["runs_dir=/proc/nope"],
        expect=["runs_dir", "/proc"],
    ),
    Case(
        "runs-dir-a-file",
        "runs_dir below a file",
        sets=["runs_dir={tmp}/file/runs"],
        setup=_write("file", "x"),
        expect=["runs_dir", "is a file"],
    ),
    # The teacher.
    Case(
        "teacher-missing",
        "a teacher path that does not exist",
        sets=["teacher.path={tmp}/nowhere"],
        expect=["teacher.path", "nowhere"],
    ),
    Case(
        "teacher-no-config",
        "a teacher directory without config.json",
        setup=lambda t: _teacher_copy(t, drop=("config.json",)),
        sets=["teacher.path={tmp}/teacher"],
        expect=["teacher", "config.json"],
    ),
    Case(
        "teacher-config-not-json",
        "a teacher whose config.json is not JSON",
        setup=lambda t: (_teacher_copy(t), (t / "teacher" / "config.json").write_text("{oops")),
        sets=["teacher.path={tmp}/teacher"],
        expect=["config.json"],
    ),
    Case(
        "teacher-not-a-decoder",
        "a teacher config without num_hidden_layers",
        setup=lambda t: _teacher_copy(t, lambda c: c.pop("num_hidden_layers")),
        sets=["teacher.path={tmp}/teacher"],
        expect=["teacher.path", "num_hidden_layers"],
    ),
    Case(
        "teacher-unsupported-type",
        "a teacher of a model type the pruner has no adapter for",
        setup=lambda t: _teacher_copy(t, lambda c: c.update(model_type="gpt2")),
        sets=["teacher.path={tmp}/teacher"],
        expect=["teacher.path", "gpt2", "supported"],
    ),
    Case(
        "teacher-tokenizer-corrupt",
        "a teacher whose tokenizer.json is damaged",
        setup=lambda t: (_teacher_copy(t), (t / "teacher" / "tokenizer.json").write_text('{"version": ')),
        sets=["teacher.path={tmp}/teacher"],
        expect=["teacher.path", "tokenizer"],
    ),
    Case(
        "teacher-quantization-unknown",
        "a teacher quantized with a method vLLM does not know",
        setup=lambda t: _teacher_copy(t, lambda c: c.update(quantization_config={"quant_method": "nosuchquant"})),
        sets=["teacher.path={tmp}/teacher"],
        expect=["teacher.path", "nosuchquant", "vLLM"],
    ),
    Case(
        "teacher-pickled-weights",
        "a teacher whose weights are pickled (pytorch_model.bin), not safetensors",
        setup=lambda t: (
            _teacher_copy(t, drop=("model.safetensors",)),
            (t / "teacher" / "pytorch_model.bin").write_bytes(b"x"),
        ),
        sets=["teacher.path={tmp}/teacher"],
        expect=["teacher.path", "pytorch_model.bin", "safetensors"],
    ),
    Case("teacher-dtype-unknown", "an unknown teacher dtype", sets=["teacher.dtype=float8"], expect=["teacher.dtype"]),
    # Pruning.
    Case("prune-method-unknown", "an unknown pruning method", sets=["prune.method=sideways"], expect=["prune.method"]),
    Case(
        "prune-ratio-above-1",
        "a target ratio above 1",
        sets=["prune.num_layers=null", "prune.intermediate_size=null", "prune.target_ratio=1.5"],
        expect=["prune.target_ratio"],
    ),
    Case(
        "prune-ratio-negative",
        "a negative target ratio",
        sets=["prune.target_ratio=-0.1"],
        expect=["prune.target_ratio"],
    ),
    Case(
        "prune-layers-too-many",
        "more layers than the teacher has",
        sets=["prune.num_layers=99"],
        expect=["prune.num_layers=99", "8"],
    ),
    Case("prune-layers-zero", "zero layers", sets=["prune.num_layers=0"], expect=["prune.num_layers"]),
    Case(
        "prune-hidden-not-multiple",
        "a hidden size that is not a multiple of the heads",
        sets=["prune.hidden_size=100"],
        expect=["prune.hidden_size=100", "num_attention_heads"],
    ),
    Case(
        "prune-heads-not-grouped",
        "query heads that do not divide into the KV groups",
        sets=["prune.num_attention_heads=5"],
        expect=["num_attention_heads", "num_key_value_heads"],
    ),
    Case(
        "prune-ffn-too-wide",
        "an FFN wider than the teacher's",
        sets=["prune.intermediate_size=100000"],
        expect=["prune.intermediate_size=100000"],
    ),
    Case("prune-selection-unknown", "an unknown selection", sets=["prune.selection=magic"], expect=["prune.selection"]),
    # Generation.
    Case(
        "generate-backend-unknown",
        "an unknown generation backend",
        sets=["generate.backend=tgi"],
        expect=["generate.backend"],
    ),
    Case(
        "generate-max-tokens-zero",
        "answers of zero tokens",
        sets=["generate.max_tokens=0"],
        expect=["generate.max_tokens"],
    ),
    Case(
        "generate-vllm-python-missing",
        "a vLLM Python that does not exist",
        sets=["generate.vllm_python={tmp}/nopython"],
        expect=["generate.vllm_python", "nopython"],
    ),
    Case(
        "generate-endpoint-key-unset",
        "an endpoint whose API key variable is not set",
        sets=["generate.endpoint={url: 'http://gpu-node:8000', model: t, api_key_env: DISTILLFLOW_NO_SUCH_KEY}"],
        expect=["generate.endpoint.api_key_env", "DISTILLFLOW_NO_SUCH_KEY"],
    ),
    Case(
        "generate-self-distill-no-answer",
        "a self-distillation template without {answer}",
        sets=["generate.mode=self_distill", "generate.self_distill={template: 'Rewrite: {instruction}'}"],
        expect=["generate.self_distill.template", "{answer}"],
    ),
    # Distillation.
    Case("distill-loss-unknown", "an unknown KD loss", sets=["distill.loss=nope"], expect=["distill.loss"]),
    Case(
        "distill-temperature-zero",
        "a zero KD temperature",
        sets=["distill.temperature=0"],
        expect=["distill.temperature"],
    ),
    Case(
        "distill-lr-negative",
        "a negative learning rate",
        sets=["distill.train.learning_rate=-1"],
        expect=["distill.train.learning_rate"],
    ),
    Case(
        "distill-steps-zero",
        "zero training steps",
        sets=["distill.train.max_steps=0"],
        expect=["distill.train.max_steps"],
    ),
    Case(
        "distill-batch-zero",
        "a batch of zero",
        sets=["distill.train.batch_size=0"],
        expect=["distill.train.batch_size"],
    ),
    # Evaluation.
    Case(
        "evaluate-task-unknown",
        "an lm-eval task that does not exist",
        sets=["evaluate.tasks=[taskworld, no_such_task_x]"],
        expect=["evaluate.tasks", "no_such_task_x"],
    ),
    Case(
        "evaluate-gate-unparsable",
        "a gate that does not parse",
        sets=["evaluate.gates=['student >> teacher']"],
        expect=["evaluate.gates", "student >> teacher"],
    ),
    Case(
        "evaluate-gate-unknown-model",
        "a gate naming a model the run does not have",
        sets=["evaluate.gates=['nobody >= teacher']"],
        expect=["evaluate.gates", "nobody"],
    ),
    Case(
        "evaluate-backend-unknown",
        "an unknown evaluation backend",
        sets=["evaluate.backend=tgi"],
        expect=["evaluate.backend"],
    ),
    # Data files.
    Case(
        "data-file-missing",
        "a data file that does not exist",
        sets=[_source("none.jsonl", prompt_field="prompt")],
        expect=["data.sources[0]", "none.jsonl"],
    ),
    Case(
        "data-file-empty",
        "an empty data file",
        setup=_write("empty.jsonl", ""),
        sets=[_source("empty.jsonl", prompt_field="prompt")],
        expect=["empty.jsonl", "empty"],
    ),
    Case(
        "data-not-utf8",
        "a data file with a line that is not UTF-8",
        setup=_write("latin1.jsonl", GOOD_ROW.encode() + b'\n{"prompt": "caf\xe9"}\n'),
        sets=[_source("latin1.jsonl", prompt_field="prompt")],
        expect=["latin1.jsonl", "line 2", "UTF-8"],
    ),
    Case(
        "data-bad-json-line",
        "a data file with a line that is not JSON",
        setup=_write("cut.jsonl", GOOD_ROW + '\n{"prompt": "x\n'),
        sets=[_source("cut.jsonl", prompt_field="prompt")],
        expect=["cut.jsonl"],
    ),
    Case(
        "data-field-missing",
        "a prompt field the records do not have",
        setup=_write("rows.jsonl", GOOD_ROW + "\n"),
        sets=[_source("rows.jsonl", prompt_field="question")],
        expect=["data.sources[0].prompt_field", "question"],
    ),
    Case(
        "data-two-prompt-kinds",
        "a source with both prompt_field and messages_field",
        sets=[_source("rows.jsonl", prompt_field="prompt", messages_field="messages")],
        expect=["data.sources[0]"],
    ),
    Case(
        "data-messages-no-template",
        "a messages source for a teacher without a chat template",
        setup=_write("chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"),
        sets=[_source("chat.jsonl", messages_field="messages")],
        expect=["messages_field", "chat template"],
    ),
]


@dataclass
class Outcome:
    case: Case
    returncode: int
    stderr: str
    stdout: str
    seconds: float
    run_dir_created: bool

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_case(case: Case, tmp: Path) -> Outcome:
    """Run ``case`` in a fresh process from the repository root, with its files under ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(tmp)
    sets = [f"runs_dir={tmp}/runs", *(s.replace("{tmp}", str(tmp)) for s in case.sets)]
    cmd = [sys.executable, "-m", "flows.cli", "run", case.config.replace("{tmp}", str(tmp)), *case.args]
    cmd += [a for s in sets for a in ("--set", s)]
    env = os.environ | {"PREFECT_HOME": str(tmp / "prefect-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    seconds = time.monotonic() - t0
    created = (tmp / "runs" / "demo").exists()
    return Outcome(case, proc.returncode, proc.stderr, proc.stdout, seconds, created)


def problems(o: Outcome) -> list[str]:
    """What is wrong with how ``o`` was refused (empty: one clean line)."""
    out = []
    if o.returncode == 0:
        out.append("accepted (exit 0)")
    if len(o.lines) != 1 or not o.lines[0].startswith("error: "):
        out.append(f"{len(o.lines)} lines on stderr")
    line = o.lines[-1] if o.lines else ""
    out += [f"does not name {e!r}" for e in o.case.expect if e not in line]
    if "Traceback" in o.stderr + o.stdout:
        out.append("a traceback")
    if CLASS_NAME.search(line):
        out.append("an exception class name")
    if o.run_dir_created:
        out.append("the run directory was created")
    return out


BEGIN, END = "<!-- bad-inputs: begin (python -m tests.faults.bad_inputs) -->", "<!-- bad-inputs: end -->"


def table(outcomes: list[Outcome], tmp: Path) -> str:
    """The markdown table of ``outcomes`` (each case's directory under ``tmp`` shown as ``<tmp>``)."""
    rows = ["| case | what | exit | the line | seconds |", "|---|---|---:|---|---:|"]
    for o in outcomes:
        line = (o.lines[-1] if o.lines else "").replace(str(tmp / o.case.id), "<tmp>").replace("|", "\\|")
        rows.append(f"| `{o.case.id}` | {o.case.what} | {o.returncode} | `{line}` | {o.seconds:.1f} |")
    return "\n".join(rows)


def main() -> int:
    import tempfile

    doc = ROOT / "docs" / "reliability.md"
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
        outcomes = [run_case(c, Path(tmp) / c.id) for c in CASES]
        rendered = table(outcomes, Path(tmp))
    bad = [(o.case.id, problems(o)) for o in outcomes if problems(o)]
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    doc.write_text(text[:start] + "\n" + rendered + "\n" + text[end:])
    for case_id, why in bad:
        print(f"{case_id}: {'; '.join(why)}")
    print(f"{len(outcomes) - len(bad)} of {len(outcomes)} refused cleanly; table written to {doc}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
