"""The docs say what the code does: figures match their files, commands exist, the README's config plans."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from tests import doc_figures
from tests.conftest import LINES, ROOT

README = ROOT / "README.md"
COMMAND = re.compile(r"(?:`|bin/|\$ )distillflow ([a-z][a-z-]*)")
MAKE = re.compile(r"(?:`|^\s*)make ([a-z][\w.-]*)", re.M)


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in doc_figures.pages())


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_every_figure_agrees_with_its_file():
    assert doc_figures.check() == []
    assert sum(len(doc_figures.figures(p)) for p in doc_figures.pages()) >= 20


def test_a_figure_that_disagrees_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "r.json").write_text('{"a": {"b": [0.5, 0.1234]}, "n": 1611456}')
    (tmp_path / "README.md").write_text(
        '[0.123](r.json "a.b[1]") [12.3%](r.json "a.b[1]") [1,611,456](r.json "n") '
        '[0.25](r.json "a.b[0] / 2")\n[0.124](r.json "a.b[1]") [13%](r.json "a.b[1]") [1](r.json "a.c")\n'
        '[0.5](missing.json "a")\n'
    )
    problems = doc_figures.check(tmp_path)
    assert [p.split(":")[1] for p in problems] == ["2", "2", "2", "3"], problems
    assert "shows 0.124" in problems[0] and "does not exist" in problems[3]


def test_every_command_shown_exists_and_has_help():
    from flows.cli import app

    runner = CliRunner()
    shown = set(COMMAND.findall(_docs_text()))
    assert {"run", "plan", "evaluate-only"} <= shown
    for command in sorted(shown):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, f"distillflow {command} --help: {result.output}"


def test_every_make_target_shown_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.M)) | set(
        re.findall(r"^\.PHONY:(.*)$", makefile, re.M)[0].split()
    )
    sources = [_docs_text()] + [p.read_text() for p in (ROOT / "compress").rglob("*.py")]
    sources += [p.read_text() for p in (ROOT / "stages").rglob("*.py")]
    shown = {t for text in sources for t in MAKE.findall(text)}
    assert {"demo", "test", "real"} <= shown
    assert shown <= targets, shown - targets


def test_the_readme_config_plans(tmp_path):
    """The README's minimal YAML, pointed at a tiny local chat model, passes ``distillflow plan``."""
    from flows.cli import app

    block = re.search(r"\*\*A complete minimal config\*\*.*?```yaml\n(.*?)```", README.read_text(), re.S)
    raw = yaml.safe_load(block.group(1))
    teacher = tmp_path / "teacher"
    shutil.copytree(ROOT / "assets" / "teacher-tiny", teacher)
    (teacher / "chat_template.jinja").write_text(LINES)
    raw["teacher"]["path"] = str(teacher)
    raw["runs_dir"] = str(tmp_path / "runs")
    # The tiny teacher's context is 128 tokens: shorter answers, the rest as written.
    raw["data"]["sources"][0]["max_tokens"] = 32
    raw["generate"]["max_tokens"] = 16
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "my.yaml")])
    assert result.exit_code == 0, result.output
    assert "self-instruct" in result.output and "pydoc_ppl" in result.output and "will run" in result.output


@pytest.mark.parametrize("name", ["evaluate-only.yaml"])
def test_the_evaluate_only_example_validates(name):
    from compress.config import EvaluateOnlyConfig, load_config

    cfg = load_config(ROOT / "configs" / name, [], EvaluateOnlyConfig)
    assert [m.name for m in cfg.models] == ["teacher", "student"]


def test_every_local_link_resolves():
    link = re.compile(r'\]\(([^)\s#]+)(?:#[^)\s]*)?(?:\s+"[^"]*")?\)')
    missing = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in doc_figures.pages()
        for target in link.findall(page.read_text())
        if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()
    ]
    assert not missing, missing
